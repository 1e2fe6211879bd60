#!/usr/bin/env python3
"""Django's command-line utility for the benchmark site.

Serve it the way the benchmarks do, with Django's own server and the
autoreloader off (the reloader forks a watcher child and re-execs):

    .deps/venv/bin/python examples/django_app/manage.py runserver --noreload 127.0.0.1:8000
"""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
