import os

from django.http import HttpResponse, JsonResponse
from django.shortcuts import render

REQUESTS = 0


def _count():
    global REQUESTS
    REQUESTS += 1
    return REQUESTS


def index(request):
    n = _count()
    return render(request, "pages/index.html", {"pid": os.getpid(), "requests": n, "items": range(1, 6)})


def health(request):
    n = _count()
    return HttpResponse(f"payload=django pid={os.getpid()} requests={n}\n", content_type="text/plain")


def item(request, n):
    _count()
    return JsonResponse({"item": n, "square": n * n})
