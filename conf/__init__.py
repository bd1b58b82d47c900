"""Hydra configs of skinclf, shipped inside the package as skinclf.conf."""
