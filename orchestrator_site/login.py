"""Login with a limit on failed attempts per username and per client address."""

import hashlib

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.core.cache import cache
from django.shortcuts import render
from django.utils.decorators import method_decorator


def _keys(request) -> list[str]:
    username = (request.POST.get("username") or "").strip().lower()
    address = request.META.get("REMOTE_ADDR", "")
    digest = hashlib.sha256(username.encode()).hexdigest()[:16]
    return [f"login-fail:user:{digest}", f"login-fail:addr:{address}"]


def _throttled(request) -> bool:
    return any((cache.get(key) or 0) >= settings.BATON_LOGIN_ATTEMPTS for key in _keys(request))


def _record_failure(request) -> None:
    for key in _keys(request):
        if cache.add(key, 1, timeout=settings.BATON_LOGIN_WINDOW_S):
            continue
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=settings.BATON_LOGIN_WINDOW_S)


@method_decorator(login_not_required, name="dispatch")
class ThrottledLoginView(auth_views.LoginView):
    def post(self, request, *args, **kwargs):
        if _throttled(request):
            minutes = settings.BATON_LOGIN_WINDOW_S // 60
            return render(
                request, "registration/login_throttled.html", {"minutes": minutes}, status=429
            )
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        _record_failure(self.request)
        return super().form_invalid(form)

    def form_valid(self, form):
        # A success clears the account's count, not the address's: one valid account must not
        # let an address keep guessing at others.
        cache.delete(_keys(self.request)[0])
        return super().form_valid(form)
