"""`manage.py check --deploy` is clean with production settings (DEBUG off, a real secret key,
HTTPS on), and the check does catch a weak setting, so a clean run means something."""

import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The check in a fresh process, as an operator runs it: only the real settings module and
    the environment, never the test overlay."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "BATON_", "SECURE_"))
        and k not in ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS")
    }
    clean.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings", BATON_VAR_DIR=str(tmp_path), **env
    )
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def production_key() -> str:
    alphabet = string.ascii_letters + string.digits + "!@#%^&*(-_=+)"
    return "".join(secrets.choice(alphabet) for _ in range(50))


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    result = check_deploy(
        tmp_path, DEBUG="false", SECRET_KEY=production_key(), ALLOWED_HOSTS="baton.example.com"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    "env, warning",
    [
        ({"SECRET_KEY": "too-short"}, "security.W009"),
        ({"SECURE_SSL_REDIRECT": "false"}, "security.W008"),
        ({"SECURE_HSTS_SECONDS": "0"}, "security.W004"),
    ],
)
def test_check_deploy_catches_a_weak_setting(tmp_path, env, warning):
    settings = {
        "DEBUG": "false",
        "SECRET_KEY": production_key(),
        "ALLOWED_HOSTS": "baton.example.com",
        **env,
    }
    result = check_deploy(tmp_path, **settings)
    assert result.returncode != 0
    assert warning in result.stdout + result.stderr


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = check_deploy(tmp_path, DEBUG="false", ALLOWED_HOSTS="baton.example.com")
    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr
