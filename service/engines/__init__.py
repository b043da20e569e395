"""Inference backends behind one small protocol (base.Engine)."""
