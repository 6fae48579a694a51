"""A self-contained HTML review report of one run: ``python -m server.report RUN_DIR``.

Reads ``RUN_DIR/summary.json`` (and ``RUN_DIR/scores.csv`` when present, to fill in per-client
values a summary lacks) and writes ``RUN_DIR/report.html``: one file with no network access
needed to view it (figures are inline base64 PNGs drawn with matplotlib's Agg renderer, styles
are inline, there is no script). Sections, each an element with a fixed id:

``overview``    the headline numbers: accuracy, detection quality, privacy, wall time
``heatmap``     clients x rounds anomaly scores; flagged cells crossed, rejected replies marked
``reputation``  each node's reputation over the rounds, known attackers in red
``curves``      central accuracy and loss per round, monitor alerts marked
``alerts``      the monitor's alert messages
``flagged``     a table of every flagged or rejected client with its evidence
``config``      the run configuration

Every string taken from the run (rejection reasons can quote client-sent values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from server.scoring import DEFAULT_Z_HALF, FEATURES, RAW_FEATURES, read_scores_csv

SUMMARY_FILE = "summary.json"
SCORES_FILE = "scores.csv"
REPORT_FILE = "report.html"
#: Flag threshold drawn when the config does not name one.
DEFAULT_THRESHOLD = 0.5
#: Figure resolution: enough to read, small enough to keep the report a few hundred kB.
DPI = 100
ATTACKER_COLOUR = "#c0392b"
HONEST_COLOUR = "#2e86c1"


@dataclass
class RunData:
    """What the report draws, gathered from summary.json and scores.csv.

    Attributes
    ----------
    rounds : list[int]
        Round numbers, ascending.
    nodes : list[int]
        Every node that was scored or rejected, ascending.
    cells : dict[tuple[int, int], dict]
        ``(round, node) -> {"combined", "flagged", "reputation", <features>}``.
    rejected : dict[tuple[int, int], str]
        ``(round, node) -> reason``.
    accuracy, loss : dict[int, float]
        Central evaluation per round (finite values only).
    malicious : set[int]
        Known attackers (empty when unknown or none).
    alerts : list[dict]
        The monitor's alerts.
    data_sources : dict[int, str]
        What each node said it trained on (its latest ``client_reports`` entry): the partition in
        simulation, the data source otherwise. Node ids are 63-bit random numbers; this is what
        lets a reader tell which client a row is.
    partitions : dict[int, int]
        The simulation partition each node reported, for short figure labels.
    """

    rounds: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    cells: dict[tuple[int, int], dict] = field(default_factory=dict)
    rejected: dict[tuple[int, int], str] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    malicious: set[int] = field(default_factory=set)
    alerts: list[dict] = field(default_factory=list)
    data_sources: dict[int, str] = field(default_factory=dict)
    partitions: dict[int, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- loading
def load_summary(run_dir: str | Path) -> dict:
    """Read and check ``RUN_DIR/summary.json``.

    Raises
    ------
    FileNotFoundError
        If the file is absent.
    ValueError
        If it is not JSON, not an object, or ``rounds``/``alerts``/``malicious_nodes`` have the
        wrong type (naming the file and key).
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a run writes it at the end)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for key, kind in (("rounds", list), ("alerts", list), ("malicious_nodes", list), ("config", dict)):
        value = summary.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{path}: '{key}' must be a {kind.__name__}, got {type(value).__name__}")
    for index, record in enumerate(summary.get("rounds") or []):
        if not isinstance(record, dict) or "round" not in record:
            raise ValueError(f"{path}: rounds[{index}] must be an object with a 'round' key")
    return summary


def gather(summary: dict, csv_rows: list[dict] | None = None) -> RunData:
    """Collect the per-(round, node) values of a summary, filled in from scores.csv rows.

    Summary values win where both have one.

    Raises
    ------
    ValueError
        On a node id or round number that is not an integer (naming where).
    """
    data = RunData()
    data.malicious = {_as_int(n, "malicious_nodes") for n in summary.get("malicious_nodes") or []}
    data.alerts = [a for a in summary.get("alerts") or [] if isinstance(a, dict)]
    rounds: set[int] = set()
    nodes: set[int] = set(data.malicious)
    for index, record in enumerate(summary.get("rounds") or []):
        where = f"rounds[{index}]"
        r = _as_int(record["round"], f"{where}.round")
        rounds.add(r)
        for metric, target in (("accuracy", data.accuracy), ("loss", data.loss)):
            value = _finite_or_none(record.get(metric))
            if value is not None:
                target[r] = value
        flagged = {_as_int(n, f"{where}.flagged") for n in record.get("flagged") or []}
        features = record.get("features") or {}
        reputation = record.get("reputation") or {}
        for key, score in (record.get("scores") or {}).items():
            node = _as_int(key, f"{where}.scores")
            nodes.add(node)
            cell = {"combined": _finite_or_none(score), "flagged": node in flagged,
                    "reputation": _finite_or_none(reputation.get(str(node), reputation.get(node)))}
            for name, value in (features.get(str(node), features.get(node)) or {}).items():
                if name != "node_id":
                    cell[name] = _finite_or_none(value)
            data.cells[(r, node)] = cell
        for key, reason in (record.get("rejected") or {}).items():
            node = _as_int(key, f"{where}.rejected")
            nodes.add(node)
            data.rejected[(r, node)] = str(reason)
        for key, report in (record.get("client_reports") or {}).items():
            node = _as_int(key, f"{where}.client_reports")
            partition = _partition(report)
            if partition is not None:
                data.partitions[node] = partition
            # The client says which partition it trains on; nothing verifies it: shown as a claim.
            source = f"claims partition {partition}" if partition is not None else _data_source(report)
            if source:
                data.data_sources[node] = source
    for row in csv_rows or []:
        r, node = row.get("round"), row.get("node_id")
        if r is None or node is None:
            continue
        rounds.add(r)
        nodes.add(node)
        cell = data.cells.setdefault((r, node), {})
        for name, value in row.items():
            if name in ("round", "node_id"):
                continue
            if cell.get(name) is None:
                cell[name] = value if name == "flagged" else _finite_or_none(value)
        cell.setdefault("flagged", False)
    data.rounds = sorted(rounds)
    data.nodes = sorted(nodes)
    return data


# ------------------------------------------------------------------------------------- figures
def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(figure)}">'


def _partition(report) -> int | None:
    """The ``partition-id`` a client report carries (simulation), else None."""
    partition = report.get("partition-id") if isinstance(report, dict) else None
    return partition if isinstance(partition, int) and not isinstance(partition, bool) else None


def _data_source(report) -> str:
    """The reported data source, cut to 60 characters (a client's own string)."""
    source = report.get("data-source") if isinstance(report, dict) else None
    return str(source)[:60] if source else ""


def _node_label(node: int, data: RunData) -> str:
    label = f"{node} (claims p{data.partitions[node]})" if node in data.partitions else str(node)
    return f"{label} *" if node in data.malicious else label


def heatmap_figure(data: RunData) -> Figure | None:
    """Clients x rounds combined scores (grey: not scored); x: flagged; R: reply rejected."""
    if not data.cells and not data.rejected:
        return None
    row_of = {n: i for i, n in enumerate(data.nodes)}
    col_of = {r: j for j, r in enumerate(data.rounds)}
    matrix = np.full((len(data.nodes), len(data.rounds)), np.nan)
    for (r, node), cell in data.cells.items():
        if cell.get("combined") is not None:
            matrix[row_of[node], col_of[r]] = cell["combined"]
    width = min(4.0 + 0.35 * len(data.rounds), 22.0)
    height = min(1.8 + 0.28 * len(data.nodes), 30.0)
    figure = Figure(figsize=(width, height))
    axes = figure.add_subplot()
    colormap = matplotlib.colormaps["magma_r"].with_extremes(bad="#e5e5e5")
    image = axes.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=colormap, vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label="combined anomaly score")
    flagged = [(col_of[r], row_of[n]) for (r, n), cell in data.cells.items() if cell.get("flagged")]
    if flagged:
        xs, ys = zip(*flagged)
        axes.scatter(xs, ys, marker="x", s=40, c="#00e5ff", linewidths=1.5, label="flagged")
    for (r, node) in data.rejected:
        axes.text(col_of[r], row_of[node], "R", ha="center", va="center", fontsize=8, color="#1a5276",
                  fontweight="bold")
    step_x = max(1, len(data.rounds) // 25)
    step_y = max(1, len(data.nodes) // 60)
    axes.set_xticks(range(0, len(data.rounds), step_x), [str(r) for r in data.rounds[::step_x]])
    axes.set_yticks(range(0, len(data.nodes), step_y), [_node_label(n, data) for n in data.nodes[::step_y]])
    for label, node in zip(axes.get_yticklabels(), data.nodes[::step_y]):
        if node in data.malicious:
            label.set_color(ATTACKER_COLOUR)
    axes.set_xlabel("round")
    axes.set_ylabel("node id (* known attacker)" if data.malicious else "node id")
    axes.set_title("Anomaly score per client and round (x flagged, R rejected, grey not scored)")
    return figure


def reputation_figure(data: RunData, threshold: float) -> Figure | None:
    """Each node's reputation over the rounds it was scored in, with the flag threshold."""
    series: dict[int, tuple[list[int], list[float]]] = {}
    for (r, node), cell in sorted(data.cells.items()):
        if cell.get("reputation") is not None:
            xs, ys = series.setdefault(node, ([], []))
            xs.append(r)
            ys.append(cell["reputation"])
    if not series:
        return None
    figure = Figure(figsize=(8.0, 4.0))
    axes = figure.add_subplot()
    # Known attackers: colour by role. Unknown: a colour and legend entry per node when few.
    per_node = not data.malicious and len(series) <= 10
    labelled: set[str] = set()
    for node, (xs, ys) in sorted(series.items()):
        attacker = node in data.malicious
        if per_node:
            label, colour = f"node {node}", None
        else:
            role = "known attacker" if attacker else ("honest node" if data.malicious else "node")
            label = None if role in labelled else role
            labelled.add(role)
            colour = ATTACKER_COLOUR if attacker else HONEST_COLOUR
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.5 if attacker else 1.0,
                  alpha=1.0 if attacker or per_node else 0.6, color=colour, label=label)
    axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"flag threshold {threshold:g}")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("round")
    axes.set_ylabel("reputation (EMA of anomaly score)")
    axes.set_title("Reputation per node (higher = worse)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def curves_figure(data: RunData) -> Figure | None:
    """Central accuracy and loss per round; alerts as red markers and vertical lines."""
    if not data.accuracy and not data.loss:
        return None
    figure = Figure(figsize=(10.0, 3.8))
    panels = (("accuracy", data.accuracy, HONEST_COLOUR), ("loss", data.loss, "#7d3c98"))
    for position, (metric, values, colour) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, position)
        if values:
            xs = sorted(values)
            axes.plot(xs, [values[x] for x in xs], marker="o", markersize=3, color=colour, label=metric)
        for alert in data.alerts:
            if alert.get("metric") != metric:
                continue
            try:
                r = int(alert.get("round"))
            except (TypeError, ValueError):
                continue
            axes.axvline(r, color=ATTACKER_COLOUR, linestyle=":", linewidth=1)
            band = alert.get("band")
            if isinstance(band, list) and len(band) == 2 and all(_finite_or_none(b) is not None for b in band):
                axes.errorbar([r], [(band[0] + band[1]) / 2], yerr=[[(band[1] - band[0]) / 2]], color="grey",
                              capsize=3, linewidth=1)
            value = _finite_or_none(alert.get("value"))
            if value is not None:
                axes.plot([r], [value], marker="X", markersize=9, color=ATTACKER_COLOUR, linestyle="none")
        axes.set_xlabel("round")
        axes.set_ylabel(metric)
        axes.set_title(f"central {metric} (red: monitor alert)")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


# -------------------------------------------------------------------------------------- tables
def flagged_rows(data: RunData) -> list[dict]:
    """One evidence row per node flagged or rejected in any round, worst first.

    Each row: ``node``, ``attacker`` (True/False, None when attackers are unknown),
    ``rounds_flagged``, ``worst_round`` and ``worst_score`` (its highest combined score among
    flagged rounds, else overall), ``features`` (the z-scores and raw values of that round),
    ``reputation`` (latest), ``rejections`` (``[(round, reason)]``).
    """
    rows = []
    for node in data.nodes:
        node_cells = {r: c for (r, n), c in data.cells.items() if n == node}
        rounds_flagged = sorted(r for r, c in node_cells.items() if c.get("flagged"))
        rejections = sorted((r, reason) for (r, n), reason in data.rejected.items() if n == node)
        if not rounds_flagged and not rejections:
            continue
        candidates = rounds_flagged or sorted(node_cells)
        scored = [r for r in candidates if node_cells[r].get("combined") is not None]
        worst = max(scored, key=lambda r: node_cells[r]["combined"]) if scored else None
        latest = [r for r in sorted(node_cells) if node_cells[r].get("reputation") is not None]
        rows.append({
            "node": node,
            "attacker": (node in data.malicious) if data.malicious else None,
            "rounds_flagged": rounds_flagged,
            "worst_round": worst,
            "worst_score": node_cells[worst]["combined"] if worst is not None else None,
            "features": {k: node_cells[worst].get(k) for k in (*FEATURES, *RAW_FEATURES)
                         if worst is not None and node_cells[worst].get(k) is not None},
            "reputation": node_cells[latest[-1]]["reputation"] if latest else None,
            "rejections": rejections,
        })
    rows.sort(key=lambda row: (-len(row["rounds_flagged"]), -(row["worst_score"] or 0.0), row["node"]))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return html.escape(f"{value:.{digits}g}") if math.isfinite(value) else html.escape(str(value))
    return html.escape(str(value))


def _rounds_text(rounds: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1-3, 5``."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def flagged_table(data: RunData) -> str:
    rows = flagged_rows(data)
    if not rows:
        return "<p>No client was flagged or rejected.</p>"
    header = ("<tr><th>node</th><th>data (as the client claims)</th><th>known attacker</th><th>rounds flagged</th><th>worst score (round)</th>"
              + "".join(f"<th>{name}</th>" for name in FEATURES)
              + "<th>reputation</th><th>rejections</th></tr>")
    body = []
    for row in rows:
        features = row["features"]
        z_cells = "".join(f"<td{_z_class(features.get(name))}>{_fmt(features.get(name))}</td>" for name in FEATURES)
        raw = ", ".join(f"{name} {_fmt(features[name])}" for name in RAW_FEATURES if name in features)
        worst = "&mdash;" if row["worst_round"] is None else f"{_fmt(row['worst_score'])} (r{row['worst_round']})"
        rejections = "<br>".join(f"r{r}: {html.escape(reason)}" for r, reason in row["rejections"]) or "&mdash;"
        attacker = {None: "unknown", True: "yes", False: "no"}[row["attacker"]]
        body.append(
            f'<tr class="{"attacker" if row["attacker"] else ""}"><td>{row["node"]}</td>'
            f"<td>{html.escape(data.data_sources.get(row['node'], '')) or '&mdash;'}</td><td>{attacker}</td>"
            f"<td>{len(row['rounds_flagged'])}: {_rounds_text(row['rounds_flagged']) or '&mdash;'}</td>"
            f"<td>{worst}</td>{z_cells}<td>{_fmt(row['reputation'])}</td><td>{rejections}</td></tr>"
            + (f'<tr class="raw"><td></td><td colspan="{len(FEATURES) + 6}">raw at worst round: {raw}</td></tr>'
               if raw else "")
        )
    return f"<table>{header}{''.join(body)}</table>"


def _z_class(value) -> str:
    return ' class="hot"' if isinstance(value, float) and value >= DEFAULT_Z_HALF else ""


def overview_table(summary: dict) -> str:
    detection = summary.get("detection")
    privacy = summary.get("privacy")
    items = [
        ("final accuracy", summary.get("final_accuracy")),
        ("best accuracy", summary.get("best_accuracy")),
        ("clean accuracy (no attack)", summary.get("clean_accuracy")),
        ("backdoor attack success rate", summary.get("backdoor_asr")),
        ("detection AUROC", detection.get("auroc") if isinstance(detection, dict) else None),
        ("detection precision", detection.get("precision") if isinstance(detection, dict) else None),
        ("detection recall", detection.get("recall") if isinstance(detection, dict) else None),
        ("privacy epsilon", privacy.get("epsilon") if isinstance(privacy, dict) else None),
        ("privacy delta", privacy.get("delta") if isinstance(privacy, dict) else None),
        ("known attackers", ", ".join(str(n) for n in summary.get("malicious_nodes") or []) or None),
        ("wall time (s)", summary.get("wall_seconds")),
    ]
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{_fmt(value, 4)}</td></tr>" for name, value in items)
    return f"<table>{rows}</table>"


def config_table(config: dict) -> str:
    if not config:
        return "<p>No configuration recorded.</p>"
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v, 6)}</td></tr>" for k, v in sorted(config.items()))
    return f"<table>{rows}</table>"


def alerts_list(alerts: list[dict]) -> str:
    if not alerts:
        return "<p>No monitor alerts.</p>"
    items = "".join(f"<li>{html.escape(str(a.get('message', a)))}</li>" for a in alerts)
    return f"<ul>{items}</ul>"


# -------------------------------------------------------------------------------------- writing
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } tr.attacker td:first-child { color: #c0392b; font-weight: bold; }
td.hot { background: #fadbd8; } tr.raw td { color: #666; font-size: 0.85em; border-top: none; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
"""


def render_html(summary: dict, data: RunData, title: str) -> str:
    """The whole report as one HTML string (figures inline)."""
    config = summary.get("config") or {}
    threshold = _finite_or_none(config.get("flag-threshold")) or DEFAULT_THRESHOLD
    sections = []

    def figure_section(section_id: str, heading: str, figure: Figure | None, alt: str, note: str, empty: str) -> None:
        content = _img(figure, alt) if figure is not None else f"<p>{html.escape(empty)}</p>"
        sections.append(f'<section id="{section_id}"><h2>{html.escape(heading)}</h2>'
                        f'<p class="note">{html.escape(note)}</p>{content}</section>')

    sections.append(f'<section id="overview"><h2>Overview</h2>{overview_table(summary)}</section>')
    figure_section("heatmap", "Anomaly scores", heatmap_figure(data), "clients by rounds anomaly-score heatmap",
                   "Combined score in [0, 1] per client and round: 0.5 means some feature (update norm, "
                   "cosine or distance to the aggregate, the rule's score) was "
                   f"{DEFAULT_Z_HALF:g} robust standard deviations from the round's median.", "No anomaly scores were recorded.")
    figure_section("reputation", "Reputation", reputation_figure(data, threshold), "reputation per node",
                   "Exponential moving average of each node's anomaly score; a node is flagged when its score "
                   "or its reputation reaches the threshold.", "No reputations were recorded.")
    figure_section("curves", "Training curves", curves_figure(data), "central accuracy and loss per round",
                   "Central evaluation after each round; red crosses are monitor alerts with the robust band "
                   "they left in grey.", "No central evaluation was recorded.")
    sections.append(f'<section id="alerts"><h2>Monitor alerts</h2>{alerts_list(data.alerts)}</section>')
    sections.append(f'<section id="flagged"><h2>Flagged and rejected clients</h2>'
                    f'<p class="note">Feature z-scores at the client\'s worst flagged round (positive = the '
                    f"suspicious direction; norm is two-sided); shaded at {DEFAULT_Z_HALF:g} or more.</p>"
                    f"{flagged_table(data)}"
                    "</section>")
    sections.append(f'<section id="config"><h2>Configuration</h2>{config_table(config)}</section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` from the run's summary (and scores.csv when present).

    Parameters
    ----------
    run_dir : str | Path
        A run's output folder.

    Returns
    -------
    Path
        The report's path.

    Raises
    ------
    FileNotFoundError
        If ``summary.json`` is absent.
    ValueError
        If ``summary.json`` or ``scores.csv`` is malformed (naming the file and what is wrong).
    """
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    scores_path = run_dir / SCORES_FILE
    csv_rows = read_scores_csv(scores_path) if scores_path.is_file() else None
    data = gather(summary, csv_rows)
    title = f"Phalanx run report: {run_dir.resolve().name}"
    path = run_dir / REPORT_FILE
    path.write_text(render_html(summary, data, title), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m server.report RUN_DIR``: write the report, print its path; exit 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m server.report RUN_DIR\n"
              "Writes RUN_DIR/report.html from RUN_DIR/summary.json (and RUN_DIR/scores.csv if present).",
              file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        path = write_report(argv[0])
    except (OSError, ValueError) as error:
        print(f"server.report: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


# ---------------------------------------------------------------------------------------- helpers
def _as_int(value, where: str) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"summary.json {where}: node id or round {value!r} is not an integer") from None


def _finite_or_none(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


if __name__ == "__main__":
    sys.exit(main())
