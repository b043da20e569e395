"""Settings: one env var = one flag = one help line, validated at start-up, redacted at /info."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from rmserve.config import Settings, default_text, parse_models, settings_from_args
from rmserve.serve import build_parser


def test_every_setting_is_a_flag_named_after_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = build_parser().format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert f"RMSERVE_{name.upper()}" in help_text, name
    monkeypatch.setenv("RMSERVE_MAX_WAIT_MS", "3")
    monkeypatch.setenv("RMSERVE_MAX_QUEUE_ITEMS", "77")
    args = build_parser().parse_args(["--max-wait-ms", "5", "--no-log-bodies"])
    settings = settings_from_args(args)
    assert settings.max_wait_ms == 5.0  # the flag wins over the env var
    assert settings.max_queue_items == 77  # the env var applies where no flag is given
    assert settings.log_bodies is False


def test_serve_help_shows_every_settings_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so each line can be read on its own
    lines = build_parser().format_help().splitlines()
    for name, field in Settings.model_fields.items():
        line = next(line for line in lines if f"[env RMSERVE_{name.upper()}]" in line)
        assert f"(default: {default_text(field.default)})" in line or (
            field.default is None and ("(default:" in line or "(unset:" in line)
        ), line
    port = next(line for line in lines if line.lstrip().startswith("--port"))
    assert "(default: 8000)" in port


def test_invalid_settings_stop_start_up_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="max_queue_items"):
        Settings(max_queue_items=0)
    with pytest.raises(ValidationError, match="not name=path"):
        Settings(models="a=x,=y")
    with pytest.raises(ValidationError, match="cache=redis needs"):
        Settings(cache="redis")
    proc = subprocess.run(
        [sys.executable, "-m", "rmserve.cli", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "port" in proc.stderr


def test_models_spec_and_public_view_redact_secrets() -> None:
    assert parse_models("/x/bundle") == {"default": Path("/x/bundle")}
    assert parse_models("a=/x, b=/y") == {"a": Path("/x"), "b": Path("/y")}
    s = Settings(api_keys="k1,k2", redis_url="redis://user:hunter2@cache:6379/0")
    public = s.public()
    assert public["api_keys"] == "***"
    assert "hunter2" not in str(public) and "k1" not in str(public)
    assert public["redis_url"].startswith("redis://user:")
