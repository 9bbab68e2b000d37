"""Documents for ``ksae harvest``: .txt paragraphs, lines or files, .jsonl records, directories,
and Hugging Face dataset names."""

from __future__ import annotations

import sys
import types

import pytest

from ksae.texts import iter_documents


def test_txt_paragraphs_lines_and_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("One line\nof a paragraph.\n\n\nSecond  paragraph.\n   \nThird.")
    assert list(iter_documents(path)) == ["One line of a paragraph.", "Second  paragraph.", "Third."]
    assert list(iter_documents(path, split="lines")) == [
        "One line", "of a paragraph.", "Second  paragraph.", "Third."]
    assert list(iter_documents(path, split="file")) == [path.read_text()]


def test_jsonl_records_and_a_directory_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "from b"}\n\n{"text": "  "}\n{"body": "x", "text": "b2"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("from a")
    (tmp_path / "ignored.csv").write_text("not text")
    assert list(iter_documents(tmp_path)) == ["from b", "b2", "from a"]
    (tmp_path / "d.jsonl").write_text('{"body": "x", "text": "y"}\n')
    assert list(iter_documents(tmp_path / "d.jsonl", text_field="body")) == ["x"]


def test_jsonl_field_errors_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl line 2 has no string field 'text'"):
        list(iter_documents(path))
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        list(iter_documents(path))


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt or .jsonl file"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="neither a .txt nor a .jsonl file"):
        list(iter_documents(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="split"):
        list(iter_documents(tmp_path / "x.csv", split="sentences"))


def test_a_dataset_name_is_streamed_with_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return [{"text": "first"}, {"text": " "}, {"text": "second"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_documents("someone/corpus", dataset_split="validation")) == ["first", "second"]
    assert calls == [("someone/corpus", "validation", True)]


def test_a_dataset_name_without_datasets_installed_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(FileNotFoundError, match="not a file or directory.*'datasets' package"):
        list(iter_documents("someone/corpus"))
