"""Skywork-o1-Open-PRM modeling and usage code as published (a test fixture; nothing in rmserve imports it)."""
