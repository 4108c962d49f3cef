"""Alerts: a failure or a risk an operator must hear about without looking for it.

    conditions.py  which conditions hold now: a pure function of a snapshot and the time
    keeper.py      the loop that raises an alert when a condition begins to hold and resolves
                   it when it clears (one catalog row per alert, at most one firing per
                   condition), publishes it retained on MQTT and hands it to delivery
    delivery.py    webhooks (JSON POST) and e-mail (SMTP), each with a queue, retries with
                   backoff, and timeouts

Conditions: a backup that failed, a restore that failed, a VM without a recovery point as
recent as its policy promises (its RPO), an agent offline for longer than allowed, recovery
points found damaged. Operators see them with `coffer alerts`, on the web console's Alerts
page, on MQTT (`coffer/v1/alerts/KIND/SUBJECT`), and wherever `[alerts]` sends them.
"""

from controller.alerts.conditions import Condition, Kind, Severity, evaluate
from controller.alerts.delivery import Delivery, Notice
from controller.alerts.keeper import AlertKeeper

__all__ = ["AlertKeeper", "Condition", "Delivery", "Kind", "Notice", "Severity", "evaluate"]
