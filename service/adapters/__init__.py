"""Adapters that let RL trainers use rmserve by changing one setting: TRL (``trl``) and veRL (``verl``).

OpenRLHF needs no adapter: it speaks ``POST /get_reward`` natively (see docs/trainers.md).
"""
