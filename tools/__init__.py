"""Reports and visualisations of training runs."""
