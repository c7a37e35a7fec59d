"""What the Databricks notebooks share: a local ``dbutils.widgets`` stand-in and widget parsing.

On Databricks the notebooks use the real ``dbutils`` and ``display``; on a laptop or in
the tests, :class:`LocalDbutils` reads each widget from the environment variable
``HYMIREC_WIDGET_<NAME>`` (falling back to the widget's default) and :func:`display`
prints.
"""

from __future__ import annotations

import os
import re
from typing import Any


class LocalWidgets:
    """The slice of ``dbutils.widgets`` the notebooks use."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def text(self, name: str, default: str = "", label: str = "") -> None:  # noqa: ARG002 - Databricks signature
        """Declare a text widget (value from ``HYMIREC_WIDGET_<NAME>`` or the default)."""
        self._values.setdefault(name, os.environ.get(f"HYMIREC_WIDGET_{name.upper()}", default))

    def dropdown(self, name: str, default: str, choices: list, label: str = "") -> None:  # noqa: ARG002
        """Declare a dropdown widget (same source as :meth:`text`)."""
        self.text(name, default, label)

    def get(self, name: str) -> str:
        """The widget's value."""
        return self._values[name]


class LocalDbutils:
    """``dbutils`` stand-in outside Databricks (only ``widgets``)."""

    def __init__(self) -> None:
        self.widgets = LocalWidgets()


def display(obj: Any) -> None:
    """Local stand-in for Databricks' ``display()``."""
    if hasattr(obj, "show"):
        obj.show(truncate=False)
    else:
        print(obj)


def declare_common_widgets(dbutils: Any) -> None:
    """The widgets every notebook has: ``profile``, ``set``, ``run_date``."""
    dbutils.widgets.text("profile", "databricks", "Config profile(s)")
    dbutils.widgets.text("set", "", "Overrides key=value (newline or ; separated)")
    dbutils.widgets.text("run_date", "", "Run date (YYYY-MM-DD)")


def parse_overrides(text: str) -> list[str]:
    """``set`` widget -> ``key=value`` list: one per line, or ``;``-separated on one line."""
    text = text.strip()
    return [item.strip() for item in re.split(r"\n" if "\n" in text else ";", text) if item.strip()]


def config_from_widgets(dbutils: Any) -> Any:
    """Load the configuration from the common widgets (and record ``run_date``)."""
    from hymirec_udfs.core.config import load_config

    run_date = dbutils.widgets.get("run_date")
    if run_date:
        os.environ["HYMIREC_RUN_DATE"] = run_date  # the as-of date, as `--run-date` (core.rundate)
    return load_config(dbutils.widgets.get("profile"), parse_overrides(dbutils.widgets.get("set")))
