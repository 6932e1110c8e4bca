"""Configuration templates: the default one is created safely by several workers at once."""

from __future__ import annotations

import multiprocessing

from devid.gateway.store.configuration import DEFAULT_TEMPLATE, ConfigTemplates


def _ensure(directory, barrier, q):
    barrier.wait()
    try:
        ConfigTemplates(directory, lambda name: None).ensure_default()
        q.put("ok")
    except Exception as exc:      # reported to the test, which fails on it
        q.put(repr(exc))


def test_default_template_created_by_many_processes_at_once(tmp_path):
    """`devid serve --workers N` starts N processes that all create DATA/config/default.toml;
    they once raced on a shared temporary file name."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        directory = tmp_path / f"config{attempt}"
        barrier = ctx.Barrier(8)
        q = ctx.Queue()
        procs = [ctx.Process(target=_ensure, args=(directory, barrier, q)) for _ in range(8)]
        for p in procs:
            p.start()
        results = [q.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * 8
        assert (directory / "default.toml").read_text() == DEFAULT_TEMPLATE
        assert sorted(p.name for p in directory.iterdir()) == ["default.toml"]
