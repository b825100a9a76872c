"""Scan kept columns, or a dump, for values that look personal or secret.

Patterns find what has a shape: email addresses, phone numbers, IP addresses, JWTs, long
random tokens, password hashes, UK NHS numbers (mod-11 checked) and payment card numbers
(Luhn checked). Names, addresses and notes have no shape: columns holding long, many-word
text are listed for a human to read instead. Values reserved for documentation (example.com,
2001:db8::/32, 203.0.113.0/24, Ofcom's drama numbers, ...) and the job's own pseudonyms are
never reported: they identify nobody.

Against the database, each table is sampled (a bounded number of rows, read-only); against
a dump, `pg_restore --data-only -f -` streams its COPY blocks and no database is needed.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from app import archive
from app import manifest as mf
from app.catalog import Catalog, Column
from app.dump import _die_with_parent
from app.errors import ConfigError, PgRestoreError
from app.pseudonym import PREFIX as PSEUDONYM_PREFIX
from app.pseudonym import TEXT_HEX as PSEUDONYM_HEX

MAX_VALUE = 65536  # characters of one value that are read
KINDS = {
    "email": "an email address",
    "phone": "a phone number",
    "ip_address": "an IP address",
    "jwt": "a JWT",
    "token": "a long random token",
    "password_hash": "a password hash",
    "nhs_number": "a UK NHS number",
    "payment_card": "a payment card number",
}
CHECKSUM_KINDS = frozenset({"nhs_number", "payment_card"})
# Types whose text cannot hold any of the patterns: not worth reading.
_SKIPPED_TYPES = frozenset(
    {"bool", "date", "time", "timetz", "timestamp", "timestamptz", "interval", "uuid"}
)
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "json", "jsonb", "xml"})

# -- patterns ------------------------------------------------------------------------------

_PASSWORD_HASH = re.compile(
    "|".join(
        [
            r"\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{53}",  # bcrypt (also inside Django's bcrypt$)
            r"\$argon2(?:id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+(?:\$[A-Za-z0-9+/]+)?",
            r"pbkdf2_sha(?:1|256|512)\$\d+\$[^$\s]+\$[A-Za-z0-9+/=]+",  # Django
            r"scrypt\$\d+\$[^$\s]+\$\d+\$\d+\$[A-Za-z0-9+/=]+",  # Django
            r"(?:sha1|md5)\$[^$\s]*\$[0-9a-f]{32,40}",  # Django's legacy hashers
            r"unsalted_(?:sha1|md5)\$\$?[0-9a-f]{32,40}",
            r"\$pbkdf2(?:-sha\d+)?\$\d+\$[./A-Za-z0-9+]+\$[./A-Za-z0-9+]+",  # passlib
            r"\$(?:1|5|6|y|7)\$(?:[^\s$]*\$){1,2}[./A-Za-z0-9]{22,}",  # crypt(3)
            r"SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+",  # PostgreSQL
            r"(?<![0-9A-Za-z])md5[0-9a-f]{32}(?![0-9A-Za-z])",  # PostgreSQL's md5
        ]
    )
)
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![A-Za-z0-9-])"
)
_RESERVED_DOMAINS = re.compile(
    r"(^|\.)(example\.(com|net|org)|example|test|invalid|localhost)$", re.IGNORECASE
)
_CARD = re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?!\w)")
_CARD_PREFIX = re.compile(r"^(4|5[1-5]|2[2-7]|3[47]|3[0689]|6)")
_NHS = re.compile(r"(?<![\w.])(\d{3})([ -]?)(\d{3})\2(\d{4})(?!\w)")
_PHONE = re.compile(r"(?<![\w+.])\+?\(?\d[\d ()./-]{7,20}\d(?![\w])")
_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4}")
_NANP = re.compile(r"^\+?1?[ .-]?\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}$")
# Ofcom's numbers for drama and documentation (national form), and NANP 555-01xx.
_FICTIONAL_PHONES = (
    "07700900",
    "01632960",
    "02079460",
    "01134960",
    "01144960",
    "01154960",
    "01164960",
    "01174960",
    "01184960",
    "01214960",
    "01314960",
    "01414960",
    "01514960",
    "01614960",
    "02890180",
    "02920180",
    "01914980",
    "08081570",
    "09098790",
    "03069990",
)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_DOCUMENTATION_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
]
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_ULID = re.compile(r"(?<![0-9A-Za-z])[0-7][0-9A-HJKMNP-TV-Z]{25}(?![0-9A-Za-z])")
_PSEUDONYM = re.compile(rf"(?<![0-9A-Za-z]){PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}\b")
_KNOWN_TOKEN = re.compile(
    r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,})"
)
_RUN = re.compile(r"[A-Za-z0-9+/=_-]{20,}")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_DIGEST_LENGTHS = (40, 64)  # SHA-1 and SHA-256 in hex: git commits and content hashes
_NO_DIGITS = str.maketrans("", "", "0123456789")
_LETTER = re.compile(r"[^\W\d_]")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def nhs_valid(digits: str) -> bool:
    """The NHS number's mod-11 check digit: weights 10..2 on the first nine digits."""
    if len(digits) != 10 or not digits.isdigit():
        return False
    check = 11 - sum(int(d) * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True)) % 11
    if check == 11:
        check = 0
    return check != 10 and check == int(digits[9])


def _public_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        return False
    return not any(address in net for net in _DOCUMENTATION_NETS)


def _phone(candidate: str) -> bool:
    text = candidate.strip()
    digits = re.sub(r"\D", "", text)
    if not 10 <= len(digits) <= 15 or _DATE.search(text) or re.fullmatch(r"[\d.]+", text):
        return False
    groups = re.findall(r"\d+", text)
    if text.startswith("+"):
        groups = groups[1:]  # the country code may be one digit
        national = "0" + digits[2:] if digits.startswith("44") else ""
    elif digits.startswith("0"):
        national = digits
    elif _NANP.match(text):
        national = ""
    else:
        return False
    if any(len(g) < 2 for g in groups):
        return False
    if national.startswith(_FICTIONAL_PHONES):
        return False
    return not re.search(r"555[ .-]?01\d\d$", text)


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _char_class(ch: str) -> int:
    return 0 if ch.islower() else 1 if ch.isupper() else 2 if ch.isdigit() else 3


def _random_token(run: str) -> bool:
    letters = sum(ch.isalpha() for ch in run)
    digits = sum(ch.isdigit() for ch in run)
    if letters < 2 or digits < 2:
        return False
    if _HEX.match(run):
        return len(run) >= 32 and len(run) not in _DIGEST_LENGTHS
    changes = sum(_char_class(a) != _char_class(b) for a, b in itertools.pairwise(run))
    return changes / (len(run) - 1) >= 0.3 and _entropy(run) >= 3.5


def detect(value: str) -> tuple[dict[str, str], set[str]]:
    """Kind -> the first match in `value`, each stretch of text counted for one kind only
    (a JWT is not also a token, a card number not also a phone number); and the checksum
    kinds of which `value` holds a candidate that fails its check."""
    found: dict[str, str] = {}
    failed: set[str] = set()
    text = value

    def take(kind: str, pattern: re.Pattern[str], accept: Any = None, check: Any = None) -> None:
        nonlocal text
        for match in list(pattern.finditer(text)):
            if accept is not None and not accept(match):
                continue
            if check is not None and not check(match):
                failed.add(kind)
                continue
            found.setdefault(kind, match.group(0))
            start, end = match.span()
            text = text[:start] + " " * (end - start) + text[end:]

    # Cheap tests on the whole value first: most values hold none of the patterns.
    if len(value) < 7:
        return found, failed
    digits = len(value) - len(value.translate(_NO_DIGITS))
    if "-" in value:
        take("ignored", _UUID)
    if len(value) >= 26:
        take("ignored", _ULID)
    if PSEUDONYM_PREFIX in value:
        take("ignored", _PSEUDONYM)
    if "$" in value:
        take("password_hash", _PASSWORD_HASH)
    if "eyJ" in value:
        take("jwt", _JWT)
    if "@" in value:
        take("email", _EMAIL, lambda m: not _RESERVED_DOMAINS.search(m.group(1)))
    if digits >= 10 and "+" in value:
        take("phone", _PHONE, lambda m: m.group(0).startswith("+") and _phone(m.group(0)))
    if digits >= 13:
        take(
            "payment_card",
            _CARD,
            lambda m: 13 <= len(d := _digits(m.group(0))) <= 19 and bool(_CARD_PREFIX.match(d)),
            lambda m: luhn(_digits(m.group(0))),
        )
    if digits >= 10:
        take("nhs_number", _NHS, None, lambda m: nhs_valid(_digits(m.group(0))))
    if digits >= 4 and "." in value:
        take("ip_address", _IPV4, lambda m: _public_ip(m.group(0)))
    if value.count(":") >= 2:
        take(
            "ip_address",
            _IPV6,
            lambda m: ("::" in m.group(0) or m.group(0).count(":") == 7) and _public_ip(m.group(0)),
        )
    if digits >= 10:
        take("phone", _PHONE, lambda m: _phone(m.group(0)))
    if len(value) >= 15:
        take("token", _KNOWN_TOKEN)
    if len(value) >= 20 and digits >= 2:
        take("token", _RUN, lambda m: _random_token(m.group(0)))
    found.pop("ignored", None)
    return found, failed - set(found)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def is_prose(value: str) -> bool:
    """Long text of many words: what a name, an address or a note looks like. In JSON, only
    the string values count, not the keys or the punctuation."""
    stripped = value.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            document = json.loads(stripped)
        except ValueError:
            pass
        else:
            return any(_prose(leaf) for leaf in _strings(document))
    return _prose(value)


def _prose(text: str) -> bool:
    if len(text) < 40:
        return False
    words = [w for w in text.split() if len(w) >= 2 and len(_LETTER.findall(w)) * 3 >= len(w) * 2]
    return len(words) >= 6


def _strings(document: Any) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for item in document.values():
            yield from _strings(item)
    elif isinstance(document, list):
        for item in document:
            yield from _strings(item)


# -- redaction -------------------------------------------------------------------------------


def redact(kind: str, match: str) -> str:
    """An example a reviewer can recognise without seeing the value."""
    if kind == "email":
        local, _, domain = match.partition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if kind in ("phone", "nhs_number"):
        return _mask_digits(match, keep=2)
    if kind == "payment_card":
        return _mask_digits(match, keep=4)
    if kind == "ip_address":
        if ":" in match:
            return match.split(":", 1)[0] + ":***"
        return match.split(".", 1)[0] + ".***.***.***"
    if kind == "password_hash":
        head = re.match(r"^(\$?[A-Za-z0-9_-]+\$)", match)
        return (head.group(1) if head else match[:4]) + f"*** ({len(match)} chars)"
    return f"{match[:4]}*** ({len(match)} chars)"


def _mask_digits(text: str, keep: int) -> str:
    total = sum(ch.isdigit() for ch in text)
    out, seen = [], 0
    for ch in text:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - keep else "*")
        else:
            out.append(ch)
    return "".join(out)


# -- results ---------------------------------------------------------------------------------


@dataclass
class ColumnScan:
    table: str
    column: str
    text: bool = True  # a text column, so free text is looked for
    sampled: int = 0  # non-NULL values read
    prose: int = 0
    matched: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, value: str) -> None:
        self.sampled += 1
        found, failed = detect(value)
        for kind, match in found.items():
            self.matched[kind] += 1
            if kind not in self.examples:
                self.examples[kind] = redact(kind, match)
        self.failed.update(failed)
        if self.text and is_prose(value):
            self.prose += 1

    @property
    def counts(self) -> dict[str, int]:
        """Kind -> values that look like it. A check digit passes by chance for one number
        in ten or eleven: a checksum kind counts only where most candidates pass it."""
        return {
            kind: n
            for kind, n in self.matched.items()
            if kind not in CHECKSUM_KINDS or n >= self.failed[kind]
        }

    @property
    def free_text(self) -> bool:
        return self.prose > 0 and self.prose * 10 >= self.sampled


@dataclass
class ScanResult:
    source: str
    rows_per_table: int
    tables: int = 0
    columns: list[ColumnScan] = field(default_factory=list)

    @property
    def findings(self) -> list[dict[str, Any]]:
        return [
            {
                "table": c.table,
                "column": c.column,
                "kind": kind,
                "count": count,
                "sampled": c.sampled,
                "example": c.examples[kind],
            }
            for c in self.columns
            for kind, count in sorted(c.counts.items())
        ]

    @property
    def free_text(self) -> list[dict[str, Any]]:
        return [
            {"table": c.table, "column": c.column, "count": c.prose, "sampled": c.sampled}
            for c in self.columns
            if c.free_text
        ]

    @property
    def clean(self) -> bool:
        return not any(c.counts for c in self.columns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_per_table": self.rows_per_table,
            "tables": self.tables,
            "columns": len(self.columns),
            "values": sum(c.sampled for c in self.columns),
            "clean": self.clean,
            "findings": self.findings,
            "free_text": self.free_text,
        }

    def render(self, fmt: str) -> str:
        report = self.as_dict()
        if fmt == "json":
            return json.dumps(report, indent=2)
        lines = [
            f"scanned {report['values']} values of {report['columns']} columns in "
            f"{report['tables']} tables of {report['source']} "
            f"(at most {report['rows_per_table']} rows a table)"
        ]
        for f in report["findings"]:
            lines.append(
                f"{f['table']}.{f['column']}: {f['count']} of {f['sampled']} values look like "
                f"{KINDS[f['kind']]}, e.g. {f['example']}"
            )
        if report["free_text"]:
            lines.append("\nfree text for a human to review (names and notes have no pattern):")
            lines += [
                f"  {c['table']}.{c['column']}: {c['count']} of {c['sampled']} values are "
                "long text of many words"
                for c in report["free_text"]
            ]
        lines.append(
            "\nclean: nothing looks personal"
            if self.clean
            else f"\nfound: {len({(f['table'], f['column']) for f in report['findings']})} "
            "columns hold values that look personal or secret"
        )
        return "\n".join(lines)


# -- against a database ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Columns of one table to sample: `label` is how the report names the table."""

    label: str
    schema: str
    table: str
    columns: list[Column]
    only: bool = True  # not a partitioned table: its own rows (a partitioned one has none)


def scannable(catalog: Catalog, column: Column) -> bool:
    info = catalog.types[column.type_oid]
    while info.kind == "d":
        info = catalog.types[info.base]
    return info.kind != "e" and not (info.schema == "pg_catalog" and info.name in _SKIPPED_TYPES)


def _text_column(catalog: Catalog, column: Column) -> bool:
    info = catalog.types[column.type_oid]
    while info.kind == "d":
        info = catalog.types[info.base]
    return info.name in _TEXT_TYPES or info.name == "citext"


def scan_tables(
    conn: psycopg.Connection[Any],
    catalog: Catalog,
    targets: Iterable[Target],
    rows: int,
    source: str,
) -> ScanResult:
    """Read at most `rows` rows of each target and scan its columns."""
    result = ScanResult(source, rows)
    for target in targets:
        columns = [c for c in target.columns if scannable(catalog, c)]
        result.tables += 1
        if not columns:
            continue
        scans = [ColumnScan(target.label, c.name, _text_column(catalog, c)) for c in columns]
        query = sql.SQL("SELECT {} FROM {}{} LIMIT {}").format(
            sql.SQL(", ").join(
                sql.SQL("left({}::text, {})").format(sql.Identifier(c.name), MAX_VALUE)
                for c in columns
            ),
            sql.SQL("ONLY " if target.only else ""),
            sql.Identifier(target.schema, target.table),
            sql.Literal(rows),
        )
        with conn.cursor() as cur:
            cur.execute(query)
            for row in cur:
                for scan, value in zip(scans, row, strict=True):
                    if value is not None:
                        scan.add(value)
        result.columns += scans
    return result


# -- against a dump --------------------------------------------------------------------------

_IDENT = r'(?:"(?:[^"]|"")*"|[^\s."(),]+)'
_COPY = re.compile(rf"^COPY ({_IDENT})\.({_IDENT}) \((.*)\) FROM stdin;$")
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))")
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _ident(text: str) -> str:
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def _unescape(field_text: str) -> str | None:
    """One field of COPY's text format."""
    if field_text == "\\N":
        return None
    if "\\" not in field_text:
        return field_text

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(int(m.group(1), 8))
        if m.group(2):
            return chr(int(m.group(2), 16))
        return _SIMPLE.get(m.group(3), m.group(3))

    return _ESCAPE.sub(one, field_text)


def _bytea_text(value: str) -> str:
    """A bytea's hex output, decoded, so that text stored as bytes is scanned as text."""
    if value.startswith("\\x") and len(value) % 2 == 0 and _HEX.match(value[2:] or "0"):
        return bytes.fromhex(value[2:]).decode("utf-8", errors="replace")
    return value


def copy_blocks(
    lines: Iterable[str],
) -> Iterator[tuple[tuple[str, str], list[str], Iterator[list[str | None]]]]:
    """((schema, table), columns, rows) for each COPY block of a pg_restore script; read
    each block's rows before asking for the next block."""
    it = iter(lines)
    for line in it:
        match = _COPY.match(line.rstrip("\n"))
        if not match:
            continue
        schema, table = _ident(match.group(1)), _ident(match.group(2))
        columns = [_ident(c.strip()) for c in re.findall(rf"{_IDENT}", match.group(3))]

        def rows(it: Iterator[str] = it) -> Iterator[list[str | None]]:
            for row in it:
                row = row.rstrip("\n")
                if row == "\\.":
                    return
                yield [_unescape(f) for f in row.split("\t")]

        yield (schema, table), columns, rows()


def scan_dump(pg_restore: archive.PgRestore, path: Path, rows: int) -> ScanResult:
    """Stream the dump's data through pg_restore (no database) and scan every column of
    every table, named as the manifest names them (a dump without one: as it has them)."""
    if not path.is_file():
        raise ConfigError(f"dump {path} does not exist or is not a file")
    try:
        manifest, location = mf.read(pg_restore, path)
    except ConfigError:
        names: dict[tuple[str, str], str] = {}
        skipped: set[tuple[str, str]] = set()
    else:
        names = {
            (t["scratch_schema"], t["scratch_name"]): f"{t['schema']}.{t['name']}"
            for t in manifest["tables"]
        }
        skipped = {(location.schema, location.table)}
    result = ScanResult(str(path), rows)
    process = subprocess.Popen(
        [pg_restore.path, "--data-only", "--file=-", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        lines = (raw.decode("utf-8", errors="replace") for raw in process.stdout)
        for table, columns, block in copy_blocks(lines):
            if table in skipped:
                for _ in block:
                    pass
                continue
            _scan_block(result, names.get(table, ".".join(table)), columns, block, rows)
    finally:
        process.stdout.close()
        stderr = process.stderr.read()
        process.stderr.close()
        code = process.wait()
    if code != 0:
        message = stderr.decode(errors="replace").strip()[-2000:]
        raise PgRestoreError(f"pg_restore could not read {path} (exit {code}): {message}")
    return result


def _scan_block(
    result: ScanResult,
    table: str,
    columns: list[str],
    block: Iterator[list[str | None]],
    rows: int,
) -> None:
    result.tables += 1
    scans = [ColumnScan(table, c) for c in columns]
    for number, row in enumerate(block):
        if number >= rows:
            continue  # read on to the block's end
        for scan, value in zip(scans, row, strict=False):
            if value is not None:
                scan.add(_bytea_text(value[:MAX_VALUE]))
    result.columns += scans
