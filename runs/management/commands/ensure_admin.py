"""Make sure a local `admin` superuser exists, without ever using a well-known password.

On first run the account gets a random password that is printed once; Baton does not store it
anywhere else. Later runs leave the account alone and say how to set a new password.
"""

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

USERNAME = "admin"


class Command(BaseCommand):
    help = "Create the superuser `admin` with a random password if it does not exist yet."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url",
            default="http://127.0.0.1:8000/accounts/login/",
            help="Login URL to print.",
        )

    def handle(self, *args, url: str, **options) -> None:
        User = get_user_model()
        password = secrets.token_urlsafe(18)
        with transaction.atomic():
            # get_or_create keeps two concurrent `make run`s from both creating the account.
            user, created = User.objects.get_or_create(
                username=USERNAME,
                defaults={"is_staff": True, "is_superuser": True, "email": ""},
            )
            if created:
                user.set_password(password)
                user.save(update_fields=["password"])

        if created:
            self.stdout.write(
                self.style.SUCCESS("Created the Baton superuser. This password is shown once:")
            )
            self.stdout.write(f"    login:    {url}")
            self.stdout.write(f"    username: {USERNAME}")
            self.stdout.write(f"    password: {password}")
        else:
            self.stdout.write(
                f"The superuser `{USERNAME}` exists; log in at {url}. Forgot the password? "
                f"Set a new one with: uv run python manage.py changepassword {USERNAME}"
            )
