"""Outputs of a run: the metrics log (JSON lines), progress display, tables, figures,
summary.md."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from .checkpoint import write_text


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation.

    Each record has "step" and "split" ("train" or "eval"). Opening an existing log
    for a resumed run drops the records after the checkpoint's step (they belong to
    steps that will be run again), and `write` skips a (split, step) already present,
    so the file continues without duplicates.
    """

    def __init__(self, path: str, resume_step: int | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.records: list[dict] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a hard kill
                    if record.get("step", 0) <= resume_step:
                        self.records.append(record)
        if enabled:
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._seen = {(r.get("split"), r.get("step")) for r in self.records}

    def write(self, record: dict) -> bool:
        key = (record.get("split"), record.get("step"))
        if key in self._seen:
            return False
        self._seen.add(key)
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        return True

    def split(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("split") == name]


def _jsonable(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_value(value) -> str:
    """A metric as table text: 4 significant digits, scientific notation outside [1e-3, 1e5)."""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """rows (column -> value) as a Markdown table, columns in the given order (default: first
    seen)."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


class Report:
    """What an experiment hands back at the end: a title, a result table (rows of
    column -> value), figure files (relative to the run directory) and notes."""

    def __init__(self, title: str, rows: list[dict], columns: list[str] | None = None,
                 figures: list[str] | None = None, notes: list[str] | None = None):
        self.title = title
        self.rows = rows
        self.columns = columns
        self.figures = figures or []
        self.notes = notes or []

    def table(self) -> str:
        return markdown_table(self.rows, self.columns)

    def markdown(self, header: dict) -> str:
        parts = [f"# {self.title}", ""]
        parts += [f"- {k}: {v}" for k, v in header.items()]
        parts += ["", "## Results", "", self.table(), ""]
        if self.notes:
            parts += [f"- {note}" for note in self.notes] + [""]
        if self.figures:
            parts += ["## Figures", ""]
            parts += [f"![{os.path.splitext(f)[0]}]({f})" for f in self.figures] + [""]
        return "\n".join(parts)

    def write(self, out_dir: str, header: dict) -> str:
        path = os.path.join(out_dir, "summary.md")
        write_text(path, self.markdown(header))
        return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str, name: str) -> str:
    """Save `fig` as out_dir/name (PNG), close it, return `name`."""
    plt = pyplot()
    fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


# Display names of the models and metrics that experiments log as "<model>/<metric>".
MODEL_LABELS = {
    "odenet": "ODE-Net", "resnet": "ResNet", "rknet": "RK-Net", "mlp": "MLP",
    "latent_ode": "Latent ODE", "rnn": "RNN", "mlp_field": "MLP field",
}
METRIC_LABELS = {
    "loss": "training loss", "test_error": "test error (%)", "acc": "training accuracy",
    "nfe": "forward NFE", "kl": "E_q[log q - log p~]", "nll": "NLL (nats)",
    "test_nll": "test NLL (nats)", "rmse_extrap": "extrapolation RMSE",
    "rmse_recon": "reconstruction RMSE", "trajectory_l1": "trajectory L1",
    "nfe_forward": "forward NFE", "nfe_backward": "backward NFE",
}
PERCENT_METRICS = ("test_error",)


def model_label(name: str) -> str:
    """"odenet" -> "ODE-Net"; flows "cnf_U1_M8" -> "CNF U1 M=8", "nf_moons" -> "NF moons"."""
    if name in MODEL_LABELS:
        return MODEL_LABELS[name]
    kind, _, rest = name.partition("_")
    if kind in ("cnf", "nf") and rest:
        parts = rest.split("_")
        if parts[-1][:1] == "M" and parts[-1][1:].isdigit():
            parts[-1] = ("M=" if kind == "cnf" else "K=") + parts[-1][1:]
        return " ".join([kind.upper(), *parts])
    return name.replace("_", " ")


def metric_label(metric: str) -> str:
    """A metric key's display name ("test_error" -> "test error (%)")."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _series(records: list[dict], key: str, scale: float = 1.0):
    points = [(r["step"], scale * r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict], keys: list[str], out_dir: str, name: str,
                title: str = "", logy: bool = False, group=None) -> str | None:
    """Metrics against the training step, several models on one panel.

    Keys "<model>/<metric>" are grouped into one panel per metric (or per `group(key)`
    when given), each model a labelled curve ("odenet/test_error" -> "ODE-Net" on the
    panel "test error (%)"); plain keys ("loss", "nfe") get a panel of their own. The
    legend sits below its panel, clear of the data. Returns the file name, or None when
    no key has a value.
    """
    keys = [k for k in keys if _series(records, k)[0]]
    if not keys:
        return None
    panels: dict[str, list[str]] = {}
    for key in keys:
        model, _, metric = key.rpartition("/")
        panel = group(key) if group is not None else (metric if model else key)
        panels.setdefault(panel, []).append(key)
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, (panel, members) in zip(axes[0], panels.items()):
        for key in members:
            model, _, metric = key.rpartition("/")
            xs, ys = _series(records, key, 100.0 if metric in PERCENT_METRICS else 1.0)
            label = None
            if model:  # without the words the panel's title already says ("U1")
                words = [w for w in model_label(model).split() if w not in panel.split()]
                label = " ".join(words) or model_label(model)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.4, label=label)
        metric = members[0].rpartition("/")[2]
        ax.set_xlabel("training step")
        ax.set_ylabel(metric_label(metric))
        if group is not None:
            ax.set_title(panel, fontsize=10)
        values = [y for k in members for y in _series(records, k)[1]]
        if logy and values and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if any(k.rpartition("/")[0] for k in members):
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8,
                      ncol=len(members) if len(members) <= 3 else 2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


class Progress:
    """A rich progress bar (loss, NFE, speed) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int, fields: tuple[str, ...], enabled: bool = True,
                 stream=None, models: list[str] | tuple = ()):
        self.total, self.fields = total, fields
        self.models = list(models)  # the order in which per-model values are shown
        self.stream = sys.stdout if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_time, self.start_step = time.perf_counter(), initial
        self._last = (self.start_time, initial)
        self._bar = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=initial, info="",
                                            speed="")
            self._bar.start()

    def _speed(self, step: int) -> float:
        """Steps per second since the last log line (the first includes compilation)."""
        now = time.perf_counter()
        (then, before), self._last = self._last, (now, step)
        return (step - before) / (now - then) if now > then else 0.0

    def _info(self, values: dict) -> str:
        """One entry per field; a field that several models log as "<model>/<field>"
        shows each model's value ("odenet loss 0.41  resnet loss 0.38"), not their sum."""
        parts = []
        for name in self.fields:
            per_model = sorted((k for k in values if k.endswith("/" + name)),
                               key=lambda k: self._rank(k[: -len(name) - 1]))
            if per_model:
                for key in per_model:
                    if values[key] is not None:
                        model = key[: -len(name) - 1]
                        parts.append(f"{model} {name} {format_value(float(values[key]))}")
            elif name in values and values[name] is not None:
                parts.append(f"{name} {format_value(float(values[name]))}")
        return "  ".join(parts)

    def _rank(self, model: str) -> tuple[int, str]:
        return (self.models.index(model) if model in self.models else len(self.models), model)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            elapsed = time.perf_counter() - self.start_time
            speed = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            self._bar.update(self._task, completed=step, speed=f"{speed:.2f} it/s")

    def log(self, step: int, values: dict) -> None:
        """Show the latest logged metrics (a plain line when not on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self._info(values))
        else:
            speed = self._speed(step)
            print(f"step {step}/{self.total}  {self._info(values)}  {speed:.2f} it/s",
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
