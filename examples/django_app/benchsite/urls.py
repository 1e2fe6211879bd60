from django.contrib import admin
from django.urls import path

from pages import views

urlpatterns = [
    path("", views.index, name="index"),
    path("health", views.health, name="health"),
    path("items/<int:n>/", views.item, name="item"),
    path("admin/", admin.site.urls),
]
