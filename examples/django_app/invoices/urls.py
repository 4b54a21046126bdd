from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.start_invoice, name="start-invoice"),
    path("<uuid:run_id>/", views.invoice_status, name="invoice-status"),
    path("<uuid:run_id>/result/", views.invoice_result, name="invoice-result"),
]
