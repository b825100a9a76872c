"""What `check` and `plan` tell a reviewer, as text or JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg

from app.plan import FAKED, GENERATED, KEPT, PSEUDONYMISED, SET, Plan, TablePlan

# Column names a reviewer should look at twice before keeping them verbatim.
SENSITIVE = re.compile(
    r"(^|_)(e?mail|phone|mobile|tel|telephone|fax|password|passwd|pwd|pass|hash|token|secret|"
    r"session|name|fullname|firstname|lastname|surname|username|address|addr|street|postcode|"
    r"zip|birth|dob|birthday|ip|ssn|nhs|nino|iban|card|salary|gender|notes?|comments?|"
    r"key|otp|salt|latitude|longitude|location|passport|licence|license)($|_)",
    re.IGNORECASE,
)


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)


def looks_sensitive(column: str) -> bool:
    return bool(SENSITIVE.search(_split_camel(column).replace(" ", "_").replace("-", "_")))


def check_report(plan: Plan) -> dict[str, Any]:
    catalog = plan.catalog
    tables = []
    for tp in plan.tables:
        table = tp.table
        replaced = {c.column.name for c in tp.columns if c.action in (FAKED, SET, PSEUDONYMISED)}
        risky = []
        for con in table.constraints:
            if con.kind in "cpux" and any(table.column(a).name in replaced for a in con.columns):
                risky.append({"constraint": con.name, "definition": con.definition})
        for index in table.indexes:
            if (
                index.unique
                and not index.of_constraint
                and (
                    any(table.column(a).name in replaced for a in index.columns if a)
                    or 0 in index.columns
                )
            ):
                risky.append({"constraint": index.name, "definition": index.method_sql})
        tables.append(
            {
                "table": table.qualified,
                "rows_estimate_bytes": table.size,
                "structure_only": tp.structure_only,
                "note": tp.note,
                "kept": tp.kept,
                "faked": [
                    {"column": c.column.name, "type": c.column.type_sql}
                    for c in tp.columns
                    if c.action == FAKED
                ],
                "set": tp.set_values,
                "pseudonymised": tp.pseudonymised,
                "generated": [c.column.name for c in tp.columns if c.column.generated],
                "constraints_on_faked": risky,
                "sensitive_kept": [c for c in tp.kept if looks_sensitive(c)],
            }
        )
    return {
        "tables": tables,
        "structure_only_tables": [tp.table.qualified for tp in plan.structure_only],
        "pseudonym_key_needed": plan.needs_pseudonym_key,
        "unlisted_tables": [f"{s}.{t}" for s, t in catalog.unlisted],
        "foreign_keys_left_out": [
            {"foreign_key": fk.describe(catalog), "reason": fk.reason} for fk in plan.left_out
        ],
        "extensions": [name for name, _ in catalog.extensions],
        "scratch_bytes_estimate": sum(t.size for t in catalog.tables),
    }


def plan_report(plan: Plan, conn: psycopg.Connection[Any]) -> dict[str, Any]:
    def column_rows(tp: TablePlan) -> list[dict[str, Any]]:
        rows = []
        for c in tp.columns:
            row: dict[str, Any] = {
                "column": c.column.name,
                "type": c.column.type_sql,
                "action": c.action,
                "fake": None,
            }
            if c.action == GENERATED:
                row["fake"] = c.column.default_sql
            elif c.fake is not None:
                row["fake"] = c.fake.as_string(conn)
            if c.action == SET:
                assert c.value is not None
                row["value"] = c.value.raw
            rows.append(row)
        return rows

    return {
        "scratch_schema": plan.scratch_schema,
        "scratch_bytes_estimate": sum(t.size for t in plan.catalog.tables),
        "tables": [
            {
                "table": tp.table.qualified,
                "scratch_table": tp.scratch_name,
                "structure_only": tp.structure_only,
                "note": tp.note,
                "order_by": list(tp.order_by),
                "bytes": tp.table.size,
                "columns": column_rows(tp),
            }
            for tp in plan.tables
        ],
        "foreign_keys_left_out": [
            {"foreign_key": fk.describe(plan.catalog), "reason": fk.reason} for fk in plan.left_out
        ],
    }


def render(report: dict[str, Any], fmt: str, kind: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=False)
    return _check_text(report) if kind == "check" else _plan_text(report)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def _check_text(report: dict[str, Any]) -> str:
    lines = [
        f"{len(report['tables'])} tables copied; scratch copy about "
        f"{_size(report['scratch_bytes_estimate'])}"
    ]
    for t in report["tables"]:
        if t["structure_only"]:
            lines.append(f"\n{t['table']}: structure only (no rows)")
        else:
            counts = [f"{len(t['kept'])} kept", f"{len(t['faked'])} faked"]
            if t["set"]:
                counts.append(f"{len(t['set'])} set")
            if t["pseudonymised"]:
                counts.append(f"{len(t['pseudonymised'])} pseudonymised")
            lines.append(f"\n{t['table']}: {', '.join(counts)}")
            faked = ", ".join(f"{f['column']} ({f['type']})" for f in t["faked"]) or "none"
            lines.append(f"  faked: {faked}")
        for column, value in t["set"].items():
            lines.append(f"  set: {column} = {json.dumps(value, ensure_ascii=False)}")
        if t["pseudonymised"]:
            lines.append(f"  pseudonymised: {', '.join(t['pseudonymised'])}")
        if t["note"]:
            lines.append(f"  note: {t['note']}")
        for con in t["constraints_on_faked"]:
            lines.append(f"  warning: {con['constraint']} ({con['definition']}) may reject a fake")
        for column in t["sensitive_kept"]:
            lines.append(f"  review: kept column {column!r} has a name that looks sensitive")
    if report["pseudonym_key_needed"]:
        lines.append("\npseudonymised columns: the dump needs PSEUDONYM_KEY")
    lines.append("\nstructure-only tables (no rows):")
    lines += [f"  {name}" for name in report["structure_only_tables"]] or ["  none"]
    lines.append("\nunlisted tables (not copied):")
    lines += [f"  {name}" for name in report["unlisted_tables"]] or ["  none"]
    lines.append("\nforeign keys left out:")
    lines += [
        f"  {fk['foreign_key']}: {fk['reason']}" for fk in report["foreign_keys_left_out"]
    ] or ["  none"]
    return "\n".join(lines)


def _plan_text(report: dict[str, Any]) -> str:
    lines = [
        f"scratch schema {report['scratch_schema']}, about "
        f"{_size(report['scratch_bytes_estimate'])} on the source while the job runs"
    ]
    for t in report["tables"]:
        if t["structure_only"]:
            lines.append(f"\n{t['table']} -> {t['scratch_table']} (structure only, no rows)")
        else:
            order = ", ".join(t["order_by"]) or "scan order"
            lines.append(f"\n{t['table']} -> {t['scratch_table']} (rows numbered by {order})")
        if t["note"]:
            lines.append(f"  note: {t['note']}")
        if t["structure_only"]:
            continue
        for c in t["columns"]:
            if c["action"] == KEPT:
                how = "kept"
            elif c["action"] == SET:
                how = f"set to {json.dumps(c['value'], ensure_ascii=False)}: {c['fake']}"
            elif c["action"] == PSEUDONYMISED:
                how = f"pseudonym: {c['fake']}"
            elif c["action"] == GENERATED:
                how = f"generated: {c['fake']}"
            else:
                how = f"fake: {c['fake']}"
            lines.append(f"  {c['column']} {c['type']}: {how}")
    for fk in report["foreign_keys_left_out"]:
        lines.append(f"\nforeign key left out: {fk['foreign_key']}: {fk['reason']}")
    return "\n".join(lines)
