"""Composites: models whose forward pass is other served models and rules (docs/composites.md)."""
