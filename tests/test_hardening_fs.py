"""Issue 20, classes 1 and 6: nothing a user owns is deleted or written to, and read-only artifacts work.

1. `--overwrite` replaces only an artifact of ours: any other thing at --out (a user's folder or file, a link, `.`,
   `..`, a folder holding the working directory) is refused in one line with nothing touched; a SIGTERM mid-build
   leaves nothing behind; artifacts are readable by others (0755 / 0644 less the umask). `build --out` likewise.
6. `validate` and `bench` write nothing unless asked (`--record`, `--out FILE`) and run on a read-only artifact; a
   write that fails after the work prints the results and then one error line (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmamba_export.artifact import ARTIFACT_FORMAT, atomic_artifact, read_manifest
from vmamba_export.build import build_folder_problem
from vmamba_export.cli import main
from vmamba_export.errors import ArtifactError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the subprocesses import this checkout, not an installed copy


def snapshot(root: Path) -> dict:
    """Every path under `root` (links not followed) with its mode and content or link target: what 'untouched' means."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            else:
                content = None
            state[path.relative_to(root).as_posix()] = (info.st_mode, content)
    return state


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def user_tree(tmp_path: Path) -> Path:
    """A user's own files: a project folder with a sub folder, a web app manifest.json (not ours), a link."""
    home = tmp_path / "home"
    (home / "project" / "sub").mkdir(parents=True)
    (home / "project" / "notes.txt").write_text("my notes\n")
    (home / "project" / "sub" / "data.csv").write_text("1,2\n")
    (home / "webapp").mkdir()
    (home / "webapp" / "manifest.json").write_text(json.dumps({"name": "my app", "schema_version": 1}))
    (home / "link").symlink_to(home / "project")
    return home


# ---------------------------------------------------------------------------------------------------------------
# 1. --overwrite replaces only an artifact of ours


@pytest.mark.parametrize(
    ("case", "cwd", "out", "fragment"),
    [
        pytest.param(
            "a user's folder",
            "home",
            "project",
            "is not a vmamba-export artifact (it has no manifest.json)",
            id="a user's folder",
        ),
        pytest.param("a user's file", "home", "project/notes.txt", "it is a file, not a folder", id="a user's file"),
        pytest.param(
            "a link to a user's folder", "home", "link", "it is a symbolic link", id="a link to a user's folder"
        ),
        pytest.param(
            "a manifest.json that is not ours",
            "home",
            "webapp",
            "does not say format",
            id="a manifest.json that is not ours",
        ),
        pytest.param("--out .", "home/project", ".", "is the current directory", id="--out ."),
        pytest.param("--out ..", "home/project/sub", "..", "contains the current directory", id="--out .."),
        pytest.param(
            "a folder holding the cwd",
            "home/project/sub",
            "{home}/project",
            "contains the current directory",
            id="a folder holding the cwd",
        ),
    ],
)
def test_overwrite_refuses_what_is_not_an_artifact(user_tree, capsys, monkeypatch, case, cwd, out, fragment):
    monkeypatch.chdir(user_tree.parent / cwd)
    before = snapshot(user_tree.parent)
    out = out.format(home=user_tree)
    status, stdout, err = run_cli(capsys, "export", "--target", "onnx-portable", "--out", out, "--overwrite")
    assert status == 2, case
    assert_one_error_line(err, fragment, "refusing")
    assert snapshot(user_tree.parent) == before, case  # nothing added (no stray temporary folder), nothing changed


def test_existing_user_folder_without_overwrite_is_not_offered_overwrite(user_tree, capsys):
    before = snapshot(user_tree)
    status, _, err = run_cli(capsys, "export", "--target", "onnx-portable", "--out", str(user_tree / "project"))
    assert status == 2
    assert_one_error_line(err, "is not a vmamba-export artifact")
    assert "--overwrite" not in err  # it would not help: only artifacts are replaced
    assert snapshot(user_tree) == before


def test_artifact_holding_the_cwd_is_not_replaced(tmp_path, capsys, monkeypatch):
    art = tmp_path / "art"
    (art / "inner").mkdir(parents=True)
    (art / "manifest.json").write_text(json.dumps({"schema_version": 1, "format": ARTIFACT_FORMAT}))
    monkeypatch.chdir(art / "inner")
    before = snapshot(tmp_path)
    status, _, err = run_cli(capsys, "export", "--target", "onnx-portable", "--out", "..", "--overwrite")
    assert status == 2
    assert_one_error_line(err, "contains the current directory")
    assert snapshot(tmp_path) == before


def test_out_under_a_file_is_one_line_and_creates_nothing(user_tree, capsys):
    before = snapshot(user_tree)
    target = user_tree / "project" / "notes.txt" / "art"
    status, _, err = run_cli(capsys, "export", "--target", "onnx-portable", "--out", str(target))
    assert status == 2
    assert_one_error_line(err, "notes.txt', which is a file, not a folder")
    assert snapshot(user_tree) == before


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The bundled digits model exported for onnx-portable through the CLI (shared by the tests below)."""
    out = tmp_path_factory.mktemp("exported") / "digits-portable"
    assert main(["export", "--target", "onnx-portable", "--out", str(out), "--json"]) == 0
    return out


def test_overwrite_replaces_an_artifact_whole_and_leaves_no_temporary_folder(exported, tmp_path, capsys):
    art = tmp_path / "parent" / "art"
    shutil.copytree(exported, art)
    (art / "left-over.txt").write_text("from the old artifact")
    old_inode = art.stat().st_ino
    status, out, err = run_cli(capsys, "export", "--target", "onnx-portable", "--out", str(art), "--overwrite")
    assert status == 0, err
    assert f"wrote {art}" in out
    assert art.stat().st_ino != old_inode and not (art / "left-over.txt").exists()
    assert read_manifest(art)["format"] == ARTIFACT_FORMAT
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]  # no .art.partial-* / .art.old-* left


def test_legacy_artifact_without_format_marker_is_still_replaceable(tmp_path):
    """Artifacts written before the format marker: schema_version 1 and the target, entry and files sections."""
    art = tmp_path / "old"
    art.mkdir()
    legacy = {"schema_version": 1, "target": {"name": "onnx-portable"}, "entry": {"model": "m"}, "files": {}}
    (art / "manifest.json").write_text(json.dumps(legacy))
    with atomic_artifact(art, overwrite=True) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"schema_version": 1, "format": ARTIFACT_FORMAT}))
    assert json.loads((art / "manifest.json").read_text())["format"] == ARTIFACT_FORMAT
    # ... but not one that lacks those sections (a user's file that happens to carry a schema_version).
    (art / "manifest.json").write_text(json.dumps({"schema_version": 1, "name": "my app"}))
    with pytest.raises(ArtifactError, match="not a vmamba-export artifact"):
        with atomic_artifact(art, overwrite=True):
            pass


def test_failure_removes_the_parent_folders_it_created(tmp_path):
    with pytest.raises(RuntimeError, match="lowering crashed"):
        with atomic_artifact(tmp_path / "a" / "b" / "art") as tmp:
            (tmp / "model.onnx").write_bytes(b"partial")
            raise RuntimeError("lowering crashed")
    assert list(tmp_path.iterdir()) == []


def test_user_folder_appearing_during_the_build_is_not_replaced(tmp_path):
    """The destination is checked again just before the rename: a folder made there meanwhile is kept."""
    out = tmp_path / "art"
    with pytest.raises(ArtifactError, match="not a vmamba-export artifact"):
        with atomic_artifact(out, overwrite=True) as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
            out.mkdir()
            (out / "mine.txt").write_text("user data")
    assert (out / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sigterm_inside_the_python_api_cleans_up_and_restores_the_handler(tmp_path):
    """In a fresh interpreter, as a program using the API runs: a process that has loaded every runtime and toolchain
    of the suite may have native signal handlers of its own, which the suite's process must not be exposed to."""
    script = textwrap.dedent(
        f"""
        import json, signal, time
        from pathlib import Path
        from vmamba_export.artifact import Terminated, atomic_artifact

        root = Path({str(tmp_path)!r})
        before = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        try:
            with atomic_artifact(root / "new" / "art") as tmp:
                (tmp / "model.onnx").write_bytes(b"partial")
                signal.raise_signal(signal.SIGTERM)
                time.sleep(5)  # not reached: the handler raises at the next bytecode
            code = None
        except Terminated as exc:
            code = exc.code
        print(json.dumps({{"before": before, "code": code, "left": [p.name for p in root.iterdir()],
                          "after": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"before": True, "code": 128 + signal.SIGTERM, "left": [], "after": True}


def test_a_programs_own_sigterm_handler_is_left_in_charge(tmp_path):
    """In a fresh interpreter (raising SIGTERM in the suite's process, after every runtime had loaded, crashed it)."""
    script = textwrap.dedent(
        f"""
        import json, signal
        from pathlib import Path
        from vmamba_export.artifact import atomic_artifact

        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        art = Path({str(tmp_path)!r}) / "art"
        with atomic_artifact(art) as tmp:
            kept = signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            signal.raise_signal(signal.SIGTERM)
            (tmp / "manifest.json").write_text("{{}}")
        print(json.dumps({{"seen": seen, "kept": kept, "written": (art / "manifest.json").is_file()}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"seen": [signal.SIGTERM], "kept": True, "written": True}


def test_sigterm_mid_export_leaves_nothing_behind(tmp_path):
    """A real `vmamba-export export` process sent SIGTERM while its artifact is being written (a CI timeout): it
    exits 143 without a traceback, and neither the artifact, its temporary folder nor the parents it made remain."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out" / "deep" / "art"
    cmd = [sys.executable, "-m", "vmamba_export", "export", "--target", "onnx-portable", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.parent.glob(".art.partial-*")):  # the build has started writing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and list(work.iterdir()) == []


def test_artifacts_are_readable_by_others_within_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_artifact(tmp_path / "a") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "model.onnx").write_bytes(b"x")
            (tmp / "lib.so").write_bytes(b"x")
            (tmp / "lib.so").chmod(0o700)
        os.umask(0o077)  # a user who wants private files gets them
        with atomic_artifact(tmp_path / "b") as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    a = tmp_path / "a"
    assert (mode(a), mode(a / "sub"), mode(a / "sub" / "model.onnx"), mode(a / "lib.so")) == (
        0o755,
        0o755,
        0o644,
        0o755,
    )
    assert (mode(tmp_path / "b"), mode(tmp_path / "b" / "model.onnx")) == (0o700, 0o600)


def test_exported_artifact_is_readable_by_others(exported):
    modes = {
        p.relative_to(exported).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [exported, *exported.rglob("*")]
    }
    umask = os.umask(0)
    os.umask(umask)
    assert modes.pop(".") == 0o755 & ~umask
    assert modes and all(m & 0o444 == 0o444 & ~umask for m in modes.values()), modes


def test_build_refuses_a_folder_that_is_not_a_build_folder(user_tree, capsys):
    before = snapshot(user_tree)
    for out, fragment in (
        (user_tree / "project", "holds no report.json of an earlier build"),
        (user_tree / "project" / "notes.txt", "it is not a folder"),
    ):
        status, _, err = run_cli(capsys, "build", "--targets", "onnx-portable", "--out", str(out), "--no-bench")
        assert status == 2
        assert_one_error_line(err, "is not a vmamba-export build folder", fragment)
    assert snapshot(user_tree) == before
    (user_tree / "project" / "report.json").write_text(json.dumps({"title": "my report"}))
    before = snapshot(user_tree)
    status, _, err = run_cli(capsys, "build", "--targets", "onnx-portable", "--out", str(user_tree / "project"))
    assert status == 2
    assert_one_error_line(err, "does not say format")
    assert snapshot(user_tree) == before


def test_build_folder_rules(tmp_path):
    assert build_folder_problem(tmp_path / "new") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_folder_problem(empty) is None
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text(json.dumps({"format": "vmamba-export-build", "artifacts": []}))
    assert build_folder_problem(earlier) is None
    legacy = tmp_path / "legacy"  # written before the format marker
    legacy.mkdir()
    (legacy / "report.json").write_text(json.dumps({"model": "m", "machine": "x", "artifacts": []}))
    assert build_folder_problem(legacy) is None


# ---------------------------------------------------------------------------------------------------------------
# 6. Read-only artifacts: validate and bench write nothing unless asked


def run_read_only(folder: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run argv with `folder` bind-mounted read-only over itself in a private mount namespace: writes there fail with
    EROFS even for root (the tests run as root, for whom chmod 0555 does not stop writes). The mount is gone when the
    process exits."""
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder), *argv]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def read_only(exported, tmp_path_factory) -> Path:
    """A copy of the exported artifact with 0555 folders and 0444 files, and proof that it cannot be written."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    folder = tmp_path_factory.mktemp("ro") / "art"
    shutil.copytree(exported, folder)
    probe = run_read_only(
        folder, sys.executable, "-c", "import sys; open(sys.argv[1] + '/probe', 'w')", str(folder), cwd=folder.parent
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()[-200:]}")
    assert probe.returncode != 0 and not (folder / "probe").exists()
    for path in [*folder.rglob("*"), folder]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return folder


def test_validate_and_bench_run_on_a_read_only_artifact(read_only):
    before = snapshot(read_only)
    cli = [sys.executable, "-m", "vmamba_export"]
    validate = run_read_only(read_only, *cli, "validate", str(read_only), "--limit", "2", cwd=read_only.parent)
    assert validate.returncode == 0, validate.stderr
    assert "parity of" in validate.stdout and "pass" in validate.stdout
    bench = run_read_only(
        read_only, *cli, "bench", str(read_only), "--runs", "2", "--warmup", "1", "--json", cwd=read_only.parent
    )
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["results"][0]["median_ms"] > 0
    assert snapshot(read_only) == before


def test_record_on_a_read_only_artifact_prints_results_then_one_error(read_only, tmp_path):
    """--record cannot write: the results come out anyway (and --out FILE, elsewhere, is still written), then one
    error line and exit 2, so a script that asked for the record sees it missing."""
    before = snapshot(read_only)
    results = tmp_path / "parity.json"
    cli = [sys.executable, "-m", "vmamba_export", "validate", str(read_only), "--limit", "2", "--json"]
    proc = run_read_only(read_only, *cli, "--record", "--out", str(results), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["status"] == "pass" and printed["runs"]
    assert "Read-only file system" in printed["error"]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--record" in lines[0] and "Read-only file system" in lines[0], proc.stderr
    saved = json.loads(results.read_text())
    assert saved["format"] == "vmamba-export-results" and saved["validation"]["runs"] == printed["runs"]
    assert snapshot(read_only) == before


def test_validate_writes_nothing_by_default_and_records_when_asked(exported, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    before = snapshot(art)
    status, out, err = run_cli(capsys, "validate", str(art), "--limit", "2", "--json")
    assert status == 0, err
    assert json.loads(out)["status"] == "pass"
    assert snapshot(art) == before
    status, out, err = run_cli(capsys, "validate", str(art), "--limit", "2", "--record")
    assert status == 0, err
    assert read_manifest(art)["validation"]["status"] == "pass"
    assert "Parity against PyTorch fp32" in (art / "report.md").read_text()


def test_record_failure_in_process_keeps_the_results(exported, tmp_path, capsys, monkeypatch):
    """The same contract where no read-only mount can be made: the manifest write is made to fail as on EROFS."""
    import vmamba_export.artifact as artifact

    def refuse(path, text):
        raise ArtifactError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(artifact, "write_text_atomic", refuse)
    status, out, err = run_cli(capsys, "bench", str(exported), "--runs", "2", "--warmup", "1", "--record")
    assert status == 2
    assert "latency of" in out and "median ms" in out
    assert_one_error_line(err, "could not record the benchmark", "Read-only file system")


def test_out_file_never_replaces_a_users_file(exported, tmp_path, capsys):
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": true}\n')
    status, _, err = run_cli(capsys, "validate", str(exported), "--limit", "2", "--out", str(mine))
    assert status == 2
    assert_one_error_line(err, "is not a results file of vmamba-export")
    assert mine.read_text() == '{"mine": true}\n'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # a results file of ours is replaced
        status, _, err = run_cli(capsys, "validate", str(exported), "--limit", "2", "--out", str(ours), "--json")
        assert status == 0, err
    assert json.loads(ours.read_text())["kind"] == "validation"
