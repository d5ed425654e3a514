"""The committed stubs are exactly what `make proto` would write."""

from __future__ import annotations

from pathlib import Path

from tools import genproto


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    fresh = genproto.generated_files(genproto.generate(tmp_path))
    committed = genproto.generated_files(genproto.STUBS_DIR)
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"


def test_every_proto_has_stubs() -> None:
    names = {p.stem for p in genproto.proto_files()}
    assert names == {"common", "session", "broker", "toolexec", "moderation", "realtime"}
    for name in names:
        assert (genproto.STUBS_DIR / f"{name}_pb2.pyi").exists()
        assert (genproto.STUBS_DIR / f"{name}_pb2_grpc.pyi").exists()
