"""Three corpora of different kinds from text present on this machine, as JSONL files `data build` reads.

  code.jsonl   the standard library's `.py` modules (the embedded default corpus)
  prose.jsonl  English prose: /usr/share/common-licenses and the README / *.txt files of /usr/share/doc, with
               each paragraph joined onto one line, the way web-text JSONL datasets store it
  zh.jsonl     Chinese: the pages of Rust by Example in Chinese (rustup's offline docs, HTML to text, code
               blocks kept) and the zh_CN man pages (roff markup removed)
A source that is absent on a machine is skipped and said so; every document keeps its path as id.

    python bench/data_corpora.py OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import re
from collections.abc import Iterator
from pathlib import Path

import ctrl_c  # noqa: F401 (Ctrl-C ends this bench, and the data benches that import it, in one line)

from seekstack.corpus.sources import read_stdlib

LICENSES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")
RUST_BY_EXAMPLE_ZH = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
MAN_ZH = Path("/usr/share/man/zh_CN")


def read_maybe_gzip(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def one_line_paragraphs(text: str) -> str:
    """Hard-wrapped paragraphs joined onto one line each; blank lines separate paragraphs."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n".join(" ".join(paragraph.split()) for paragraph in paragraphs if paragraph.strip())


def prose_documents() -> Iterator[tuple[str, str]]:
    paths = sorted(LICENSES.glob("*")) if LICENSES.is_dir() else []
    if DOCS.is_dir():
        paths += sorted(p for p in DOCS.rglob("*") if p.is_file() and re.match(r"(README|.*\.txt)", p.name))
    for path in paths:
        if path.is_file():
            yield str(path), one_line_paragraphs(read_maybe_gzip(path))


class _PageText(html.parser.HTMLParser):
    """The text of an mdBook page's <main>, paragraphs and code blocks on lines of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.parts = 0, []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "main":
            self.depth += 1
        if self.depth and tag in ("p", "pre", "li", "h1", "h2", "h3", "br", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "main":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _PageText()
    parser.feed(page)
    lines = (line.rstrip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def roff_text(source: str) -> str:
    """A man page's text: comments and requests dropped, section titles kept, font escapes removed."""
    lines = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            request, _, rest = line.partition(" ")
            if request in (".SH", ".SS", ".TH", ".B", ".I", ".BR", ".IR", ".IP", ".TP") and rest:
                lines.append(rest.replace('"', ""))
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\\(..", "", text)
    return text.replace("\\-", "-").replace("\\e", "\\")


def zh_documents() -> Iterator[tuple[str, str]]:
    book = RUST_BY_EXAMPLE_ZH / "rust-by-example" / "zh"
    for path in sorted(book.rglob("*.html")) if book.is_dir() else []:
        if path.name not in ("print.html", "toc.html", "404.html"):
            yield str(path), html_text(path.read_text(encoding="utf-8"))
    for path in sorted(MAN_ZH.rglob("*")) if MAN_ZH.is_dir() else []:
        if path.is_file():
            yield str(path), roff_text(read_maybe_gzip(path))


def code_documents() -> Iterator[tuple[str, str]]:
    for doc in read_stdlib():
        yield doc.doc_id, doc.text


def write_jsonl(path: Path, documents: Iterator[tuple[str, str]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for doc_id, text in documents:
            out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count


CORPORA = {"code": code_documents, "prose": prose_documents, "zh": zh_documents}


def assemble(out_dir: Path) -> dict[str, Path]:
    """Write `{name}.jsonl` for each corpus whose text this machine has; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, documents in CORPORA.items():
        path = out_dir / f"{name}.jsonl"
        count = write_jsonl(path, documents())
        if count:
            written[name] = path
        print(f"{path}: {count} documents" + ("" if count else " (no source text on this machine; skipped)"))
    return written


def corpora_folder(description: str) -> Path:
    """The corpora folder named on the command line (the one this script writes), its three files checked: one
    missing is refused naming the folder, the file and the command that writes it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpora", type=Path, nargs="?", default=Path("data/bench_corpora"))
    folder = parser.parse_args().corpora
    missing = missing_corpora(folder)
    if missing:
        parser.error(missing)
    return folder


def missing_corpora(folder: Path) -> str | None:
    """Which of the three corpora files `folder` lacks, with the command that writes them; None when it has all."""
    missing = [f"{name}.jsonl" for name in CORPORA if not (folder / f"{name}.jsonl").is_file()]
    if missing:
        return f"{folder} has no {', '.join(missing)}: write them with python bench/data_corpora.py {folder}"
    return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/bench_corpora"))
    assemble(parser.parse_args().out_dir)
