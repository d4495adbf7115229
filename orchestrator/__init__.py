"""Sweep orchestrator: search-space spec -> Ray Tune trials -> mmseg workers -> MLflow."""
