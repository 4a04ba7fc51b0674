"""Lay a report (one run's, or a comparison of two) out as Markdown and as one self-contained HTML
page. Both carry the plots as inline SVG: the Markdown file is then a single file too, with no image
files beside it to lose (renderers that show HTML in Markdown draw them; others show the tables)."""

from __future__ import annotations

from html import escape

from esper_core.telemetry.report.tables import Table

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 28px 0 8px 0; }
.ok { color: #1a7f37; } .bad { color: #b42318; font-weight: bold; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 8px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td { word-break: break-word; max-width: 620px; }
figure { margin: 8px 0 16px 0; } svg { display: block; max-width: 100%; height: auto; }
"""

Note = tuple[bool, str]
"""A status line under the title: (good, text); a bad one is shown in bold red in HTML."""


def markdown(title: str, notes: list[Note], plots: dict[str, str], tables: list[Table]) -> str:
    """Markdown with every plot inline; each SVG is an HTML block (no blank line inside it)."""
    out = [f"# {title}", ""]
    out += [f"{'' if good else '**'}{_md_cell(text)}{'' if good else '**'}" for good, text in notes]
    out += [""] if notes else []
    for svg in plots.values():
        out += [svg, ""]
    for table in tables:
        out += [f"## {table.title}", ""] + _md_table(table) + [""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    if not table.rows:
        return [table.empty]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]


def html(title: str, notes: list[Note], plots: dict[str, str], tables: list[Table]) -> str:
    """One HTML file with every plot inline: it opens offline, from a mail attachment or an archive."""
    body = [f"<h1>{escape(title)}</h1>"]
    body += [f'<p class="{"ok" if good else "bad"}">{escape(text)}</p>' for good, text in notes]
    body += [f'<figure id="figure-{escape(plot_id)}">{svg}</figure>' for plot_id, svg in plots.items()]
    for table in tables:
        body += [f"<h2>{escape(table.title)}</h2>", _html_table(table)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_table(table: Table) -> str:
    if not table.rows:
        return f"<p>{escape(table.empty)}</p>"
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
