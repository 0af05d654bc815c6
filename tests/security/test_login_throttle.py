import pytest


@pytest.fixture
def throttle(settings):
    settings.BATON_LOGIN_ATTEMPTS = 3


def _login(client, username, password, address="10.1.1.1"):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def test_repeated_failed_logins_are_refused_with_429(client, alice, throttle):
    for _ in range(3):
        assert _login(client, "alice", "wrong").status_code == 200
    response = _login(client, "alice", "alice-pass-123")
    assert response.status_code == 429
    assert b"Too many failed logins" in response.content
    assert "_auth_user_id" not in client.session


def test_throttle_counts_per_address_across_usernames(client, alice, bob, throttle):
    for name in ("x1", "x2", "x3"):
        _login(client, name, "wrong", address="10.2.2.2")
    assert _login(client, "bob", "bob-pass-123", address="10.2.2.2").status_code == 429
    assert _login(client, "bob", "bob-pass-123", address="10.3.3.3").status_code == 302


def test_a_good_login_below_the_limit_works_and_resets_the_account(client, alice, throttle):
    _login(client, "alice", "wrong", address="10.4.4.4")
    assert _login(client, "alice", "alice-pass-123", address="10.4.4.5").status_code == 302
