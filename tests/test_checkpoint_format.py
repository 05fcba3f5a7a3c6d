"""The on-disk format's records, I/O-free: JSON written by earlier versions round-trips to the
same bytes, and what is malformed, of another format or of a newer version is refused."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from checkpoint import CheckpointCorruptError, PerRank, Shard
from checkpoint._commit import merge_parts
from checkpoint._plan import plan_save
from checkpoint._tree import encode
from checkpoint.format import (FORMAT_VERSION, FileEntry, Manifest, Part, PieceEntry, SlotMeta,
                               TensorEntry, dumps, generation_of, part_name, rank_file_base,
                               step_dirname, step_of_dirname)

# Written by the code before the format had records (commit 553ba78): two ranks, generation
# 3, step 7, of the state in state_of() below; the slot is rank 0's memory tier ("inode"
# dropped, url shortened).
PART0 = (
    '{"format":"elastic-checkpoint","version":1,"step":7,"rank":0,"world_size":2,"generat'
    'ion":3,"file":{"name":"r00000-of-00002.g3.safetensors","size_bytes":4142,"crc32":"77'
    'c8e850"},"tensors":{"w":{"dtype":"F32","shape":[5,3],"kind":"replicated","pieces":[{'
    '"file":"r00000-of-00002.g3.safetensors","name":"w[0:3]","offsets":[0,0],"shape":[3,3'
    '],"begin":4096,"end":4132}]},"sh":{"dtype":"I16","shape":[8],"kind":"sharded","piece'
    's":[{"file":"r00000-of-00002.g3.safetensors","name":"sh","offsets":[0],"shape":[4],"'
    'begin":4132,"end":4140}]},"rank0/r/x":{"dtype":"U8","shape":[2],"kind":"per_rank","p'
    'ieces":[{"file":"r00000-of-00002.g3.safetensors","name":"rank0/r/x","offsets":[0],"s'
    'hape":[2],"begin":4140,"end":4142}]}},"tree":{"t":"dict","items":[["w",{"t":"tensor"'
    ',"key":"w","fw":"numpy"}],["s",{"t":"np","dtype":"<f4","v":2.0}],["sh",{"t":"tensor"'
    ',"key":"sh","fw":"numpy","shard":true}],["r",{"t":"per_rank","v":{"t":"dict","items"'
    ':[["n",0],["x",{"t":"tensor","key":"rank0/r/x","fw":"numpy"}]]}}],["step",7]]}}')

PART1 = (
    '{"format":"elastic-checkpoint","version":1,"step":7,"rank":1,"world_size":2,"generat'
    'ion":3,"file":{"name":"r00001-of-00002.g3.safetensors","size_bytes":4130,"crc32":"9b'
    '215d35"},"tensors":{"w":{"dtype":"F32","shape":[5,3],"kind":"replicated","pieces":[{'
    '"file":"r00001-of-00002.g3.safetensors","name":"w[3:5]","offsets":[3,0],"shape":[2,3'
    '],"begin":4096,"end":4120}]},"sh":{"dtype":"I16","shape":[8],"kind":"sharded","piece'
    's":[{"file":"r00001-of-00002.g3.safetensors","name":"sh","offsets":[4],"shape":[4],"'
    'begin":4120,"end":4128}]},"rank1/r/x":{"dtype":"U8","shape":[2],"kind":"per_rank","p'
    'ieces":[{"file":"r00001-of-00002.g3.safetensors","name":"rank1/r/x","offsets":[0],"s'
    'hape":[2],"begin":4128,"end":4130}]}},"tree":{"t":"dict","items":[["w",{"t":"tensor"'
    ',"key":"w","fw":"numpy"}],["s",{"t":"np","dtype":"<f4","v":2.0}],["sh",{"t":"tensor"'
    ',"key":"sh","fw":"numpy","shard":true}],["r",{"t":"per_rank","v":{"t":"dict","items"'
    ':[["n",1],["x",{"t":"tensor","key":"rank1/r/x","fw":"numpy"}]]}}],["step",7]]}}')

MANIFEST = (
    '{"format":"elastic-checkpoint","version":1,"step":7,"generation":3,"world_size":2,"c'
    'reated_unix_s":1796107341.0531287,"files":[{"name":"r00000-of-00002.g3.safetensors",'
    '"size_bytes":4142,"checksum":"crc32:77c8e850"},{"name":"r00001-of-00002.g3.safetenso'
    'rs","size_bytes":4130,"checksum":"crc32:9b215d35"}],"tensors":{"w":{"dtype":"F32","s'
    'hape":[5,3],"kind":"replicated","pieces":[{"file":"r00000-of-00002.g3.safetensors","'
    'name":"w[0:3]","offsets":[0,0],"shape":[3,3],"begin":4096,"end":4132},{"file":"r0000'
    '1-of-00002.g3.safetensors","name":"w[3:5]","offsets":[3,0],"shape":[2,3],"begin":409'
    '6,"end":4120}]},"sh":{"dtype":"I16","shape":[8],"kind":"sharded","pieces":[{"file":"'
    'r00000-of-00002.g3.safetensors","name":"sh","offsets":[0],"shape":[4],"begin":4132,"'
    'end":4140},{"file":"r00001-of-00002.g3.safetensors","name":"sh","offsets":[4],"shape'
    '":[4],"begin":4120,"end":4128}]},"rank0/r/x":{"dtype":"U8","shape":[2],"kind":"per_r'
    'ank","pieces":[{"file":"r00000-of-00002.g3.safetensors","name":"rank0/r/x","offsets"'
    ':[0],"shape":[2],"begin":4140,"end":4142}]},"rank1/r/x":{"dtype":"U8","shape":[2],"k'
    'ind":"per_rank","pieces":[{"file":"r00001-of-00002.g3.safetensors","name":"rank1/r/x'
    '","offsets":[0],"shape":[2],"begin":4128,"end":4130}]}},"trees":[{"t":"dict","items"'
    ':[["w",{"t":"tensor","key":"w","fw":"numpy"}],["s",{"t":"np","dtype":"<f4","v":2.0}]'
    ',["sh",{"t":"tensor","key":"sh","fw":"numpy","shard":true}],["r",{"t":"per_rank","v"'
    ':{"t":"dict","items":[["n",0],["x",{"t":"tensor","key":"rank0/r/x","fw":"numpy"}]]}}'
    '],["step",7]]},{"t":"dict","items":[["w",{"t":"tensor","key":"w","fw":"numpy"}],["s"'
    ',{"t":"np","dtype":"<f4","v":2.0}],["sh",{"t":"tensor","key":"sh","fw":"numpy","shar'
    'd":true}],["r",{"t":"per_rank","v":{"t":"dict","items":[["n",1],["x",{"t":"tensor","'
    'key":"rank1/r/x","fw":"numpy"}]]}}],["step",7]]}]}')

SLOT = (
    '{"format":"elastic-checkpoint","step":7,"generation":3,"rank":0,"world_size":2,"url"'
    ':"/ckpt/run","data_bytes":88,"tree":{"t":"dict","items":[["w",{"t":"tensor","key":"w'
    '","fw":"numpy"}],["s",{"t":"np","dtype":"<f4","v":2.0}],["sh",{"t":"tensor","key":"s'
    'h","fw":"numpy","shard":true}],["r",{"t":"per_rank","v":{"t":"dict","items":[["n",0]'
    ',["x",{"t":"tensor","key":"rank0/r/x","fw":"numpy"}]]}}],["step",7]]},"tensors":{"w"'
    ':{"dtype":"F32","shape":[5,3],"kind":"replicated","pieces":[{"file":"slot","offsets"'
    ':[0,0],"shape":[3,3],"begin":0,"end":36},{"file":"slot","offsets":[3,0],"shape":[2,3'
    '],"begin":64,"end":88}]},"sh":{"dtype":"I16","shape":[8],"kind":"sharded","pieces":['
    '{"file":"slot","offsets":[0],"shape":[4],"begin":36,"end":44}]},"rank0/r/x":{"dtype"'
    ':"U8","shape":[2],"kind":"per_rank","pieces":[{"file":"slot","offsets":[0],"shape":['
    '2],"begin":44,"end":46}]}}}')


def state_of(rank):
    return {"w": np.arange(15, dtype=np.float32).reshape(5, 3),
            "s": np.float32(2.0) * np.ones((), np.float32),
            "sh": Shard(np.arange(4, dtype=np.int16) + 4 * rank, (4 * rank,), (8,)),
            "r": PerRank({"n": rank, "x": np.arange(2, dtype=np.uint8)}), "step": 7}


@pytest.mark.parametrize("text,record", [(PART0, Part), (PART1, Part), (MANIFEST, Manifest),
                                         (SLOT, SlotMeta)])
def test_records_written_before_round_trip_to_the_same_bytes(text, record):
    parsed = record.from_json(json.loads(text), "gold")
    assert dumps(parsed) == text.encode()
    assert record.from_json(json.loads(dumps(parsed)), "again") == parsed


def test_records_are_typed_and_frozen():
    m = Manifest.loads(MANIFEST.encode(), "manifest.json")
    assert (m.step, m.generation, m.world_size, m.version) == (7, 3, 2, 1)
    assert [f.name for f in m.files] == ["r00000-of-00002.g3.safetensors",
                                         "r00001-of-00002.g3.safetensors"]
    assert m.files[1] == FileEntry("r00001-of-00002.g3.safetensors", 4130, 0x9B215D35)
    assert m.size_bytes == 4142 + 4130
    w = m.tensors["w"]
    assert (w.dtype, w.shape, w.kind, w.numel) == ("F32", (5, 3), "replicated", 15)
    assert w.pieces[1] == PieceEntry("r00001-of-00002.g3.safetensors", (3, 0), (2, 3), 4096, 4120,
                                     "w[3:5]")
    assert m.tree_for(1)["items"][3][1]["v"]["items"][0] == ["n", 1]
    assert m.tree_for(5) == m.trees[0]  # a rank the saving world lacked gets rank 0's tree
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.step = 8  # type: ignore[misc]
    slot = SlotMeta.from_json({**json.loads(SLOT), "inode": 12})  # the slot's own key is ignored
    assert slot.tensors["w"].pieces[0].name is None and slot.data_bytes == 88


def test_planner_and_merge_reproduce_what_was_written_before():
    gold_parts = [Part.from_json(json.loads(t)) for t in (PART0, PART1)]
    parts = []
    for rank, gold in enumerate(gold_parts):
        tree, leaves = encode(state_of(rank), rank)
        plan = plan_save(leaves, rank, 2)
        base = rank_file_base(rank, 2, 3)
        header = plan.header({"format": "elastic-checkpoint", "step": "7", "rank": str(rank),
                              "generation": "3"})
        assert len(header) == 4096
        part = Part(7, rank, 2, 3, gold.file, plan.part_tensors(f"{base}.safetensors", len(header)),
                    tree)
        assert dumps(part) == (PART0, PART1)[rank].encode()
        if rank == 0:
            slot = SlotMeta(7, 3, 0, 2, "/ckpt/run", plan.total_bytes, tree, plan.slot_tensors())
            assert dumps(slot) == SLOT.encode()
        parts.append(part)
    gold = Manifest.loads(MANIFEST.encode(), "manifest.json")
    merged = merge_parts(7, 3, 2, parts)
    assert dumps(dataclasses.replace(merged, created_unix_s=gold.created_unix_s)) == MANIFEST.encode()


def _manifest():
    return json.loads(MANIFEST)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, "1", None, True])
def test_a_bad_version_is_corrupt(version):
    d = _manifest()
    d["version"] = version
    with pytest.raises(CheckpointCorruptError, match="version"):
        Manifest.from_json(d, "m.json")
    p = json.loads(PART0)
    p["version"] = version
    with pytest.raises(CheckpointCorruptError, match="version"):
        Part.from_json(p, "p.json")


@pytest.mark.parametrize("field", ["version", "step", "generation", "world_size", "tensors",
                                   "trees"])
def test_a_missing_manifest_field_is_corrupt(field):
    d = _manifest()
    del d[field]
    with pytest.raises(CheckpointCorruptError, match=f"m.json: missing field '{field}'"):
        Manifest.from_json(d, "m.json")


@pytest.mark.parametrize("field", ["step", "rank", "world_size", "generation", "file", "tensors",
                                   "tree"])
def test_a_missing_part_field_is_corrupt(field):
    d = json.loads(PART1)
    del d[field]
    with pytest.raises(CheckpointCorruptError, match=f"missing field '{field}'"):
        Part.from_json(d, "p.json")


def test_a_missing_slot_field_is_corrupt():
    for field in ("step", "url", "data_bytes", "tensors"):
        d = json.loads(SLOT)
        del d[field]
        with pytest.raises(CheckpointCorruptError, match=field):
            SlotMeta.from_json(d)


def _mutated(edit):
    d = _manifest()
    edit(d)
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "not an elastic-checkpoint manifest"),
    (lambda d: d.pop("files"), "not an elastic-checkpoint manifest"),
    (lambda d: d.update(step=-1), "'step' is -1"),
    (lambda d: d.update(world_size=0), "'world_size' is 0"),
    (lambda d: d.update(generation=3.0), "'generation' is 3.0"),
    (lambda d: d["trees"].pop(), "1 trees for a world of 2"),
    (lambda d: d.update(created_unix_s="now"), "created_unix_s"),
    (lambda d: d["files"][0].update(checksum="md5:00"), "unknown checksum 'md5:00'"),
    (lambda d: d["files"][0].update(checksum="crc32:zz"), "malformed checksum 'zz'"),
    (lambda d: d["files"][0].pop("size_bytes"), "missing field 'size_bytes'"),
    (lambda d: d["tensors"]["w"].update(dtype="F128"), "unknown dtype 'F128'"),
    (lambda d: d["tensors"]["w"].update(kind="mirrored"), "unknown tensor kind 'mirrored'"),
    (lambda d: d["tensors"]["w"].update(shape=[5, -3]), "non-negative integers"),
    (lambda d: d["tensors"]["w"].update(pieces={}), "'pieces' is not a list"),
    (lambda d: d["tensors"]["w"]["pieces"][0].update(offsets=[0]), "inconsistent"),
    (lambda d: d["tensors"]["w"]["pieces"][0].update(end=1), "inconsistent"),
    (lambda d: d["tensors"]["w"]["pieces"][0].update(name=3), "not a string"),
    (lambda d: d["tensors"]["sh"]["pieces"][0].update(offsets=[0, 0], shape=[4, 1]),
     "piece of shape"),
    (lambda d: d.update(tensors=[]), "expected an object"),
])
def test_malformed_manifests_are_corrupt(edit, message):
    with pytest.raises(CheckpointCorruptError, match=message):
        Manifest.from_json(_mutated(edit), "m.json")


def test_unreadable_json_is_corrupt():
    with pytest.raises(CheckpointCorruptError, match="m.json: unreadable manifest"):
        Manifest.loads(b"{not json", "m.json")
    with pytest.raises(CheckpointCorruptError, match="p.json: unreadable part"):
        Part.loads(b"", "p.json")
    with pytest.raises(CheckpointCorruptError, match="not an elastic-checkpoint"):
        Manifest.loads(b"[1, 2]", "m.json")


def test_tensor_entry_round_trip_and_with_pieces():
    t = TensorEntry("BF16", (4, 2), "sharded")
    assert TensorEntry.from_json(t.to_json(), "t") == t and t.to_json()["pieces"] == []
    p = PieceEntry("slot", (2, 0), (2, 2), 64, 72)
    assert "name" not in p.to_json() and p.numel == 4
    assert t.with_pieces([p]).pieces == (p,)


def test_names():
    assert step_dirname(100) == "step-000000000100"
    assert step_of_dirname("step-000000000100") == 100
    assert step_of_dirname("step-100") is None and step_of_dirname("step-000000000100.tmp") is None
    assert part_name(1, 2, 3) == "r00001-of-00002.g3.part.json"
    assert generation_of("r00001-of-00002.g13.safetensors") == 13
    assert generation_of("manifest.json") is None
