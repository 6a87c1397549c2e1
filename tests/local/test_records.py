"""The resource store: records that survive restarts and are shared by threads and processes."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from activities.clouds.aib.tags import ROLE_TEMPORARY, TAG_BUILD_ID, kiln_tags
from activities.clouds.local.records import ResourceStore

pytestmark = pytest.mark.local


def test_record_get_list_forget(tmp_path: Path) -> None:
    store = ResourceStore(tmp_path / "resources.db")
    first = store.record(
        "vm-1", kind="vm", build_id="b1", tags=kiln_tags("b1", role=ROLE_TEMPORARY), data={"ip": "127.0.1.2"}
    )
    store.record("disk-1", kind="disk", build_id="b1")
    store.record("vm-2", kind="vm", build_id="b2")
    again = store.record("vm-1", kind="vm", build_id="b1", data={"ip": "127.0.1.3"})
    assert again.created_at == first.created_at and again.data == {"ip": "127.0.1.3"} and again.tags == {}

    reopened = ResourceStore(tmp_path / "resources.db")  # a restart: the records are still there
    assert [r.id for r in reopened.list(build_id="b1")] == ["vm-1", "disk-1"]
    assert [r.id for r in reopened.list(kind="vm")] == ["vm-1", "vm-2"]
    assert [r.id for r in reopened.list(build_id="b1", kind="disk")] == ["disk-1"]
    assert reopened.get("vm-2").build_id == "b2" and reopened.get("nope") is None
    reopened.forget("vm-1")
    reopened.forget("vm-1")
    assert reopened.get("vm-1") is None
    assert store.update("nope", {"a": 1}) is None
    assert store.record("g", kind="gallery", build_id=None).build_id is None
    assert kiln_tags("b1", role=ROLE_TEMPORARY, extra={TAG_BUILD_ID: "forged", "team": "x"})[TAG_BUILD_ID] == "b1"


def test_updates_from_many_threads_are_all_kept(tmp_path: Path) -> None:
    store = ResourceStore(tmp_path / "resources.db")
    store.record("version", kind="galleryImageVersion", build_id="b1", data={"state": "Creating"})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: store.update("version", {f"region{n % 8}": n}), range(80)))
    data = store.get("version").data
    assert data["state"] == "Creating" and sorted(k for k in data if k.startswith("region")) == [
        f"region{n}" for n in range(8)
    ]


def _claim_all(path: str, build_id: str) -> list[str]:
    store = ResourceStore(Path(path))
    return [store.claim(f"v{n}", kind="galleryImageVersion", build_id=build_id).build_id or "" for n in range(40)]


def test_claims_across_processes_have_one_winner(tmp_path: Path) -> None:
    path = str(tmp_path / "resources.db")
    ResourceStore(Path(path))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_claim_all, [(path, f"build{n}") for n in range(4)])
    store = ResourceStore(Path(path))
    winners = [store.get(f"v{n}").build_id for n in range(40)]
    assert len(store.list()) == 40
    for seen in results:
        assert seen == winners  # every process saw the one record that won, never its own lost write
