"""The orders domain's model: plain code the workflow calls as steps."""

from __future__ import annotations

from typing import Any


class OrderModel:
    def findOrder(self, order_id: int) -> dict[str, Any]:  # noqa: N802 - the seed's camelCase style
        return {"id": order_id, "items": [{"sku": "tea", "price": 4500}, {"sku": "cake", "price": 6000}]}

    def total(self, order: dict[str, Any]) -> int:
        return sum(item["price"] for item in order["items"])
