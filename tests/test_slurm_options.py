"""`launch slurm`'s options as rendered and refused, without a cluster: what
Slurm users pass (issue 14, point 9), --log and its deprecated alias
--output, --requeue/--signal (point 2). tests/test_launch_slurm.py submits
the same scripts to a real slurmctld."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ok, run

TRAINER = ["python", "-m", "trainer", "--epochs", "3"]


def slurm(*args, cwd):
    # PATH without sbatch: nothing here can be submitted, whatever goes wrong.
    return run([sys.executable, "-m", "launch", "slurm", *args], cwd=cwd, PATH="/nonexistent")


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_what_slurm_users_pass_becomes_sbatch_lines(tmp_path):
    proc = ok(slurm("--account", "proj-1", "--qos", "high", "--mem", "16G", "--cpus-per-task", "4",
                    "--constraint", "a100&[rack1|rack2]", "--exclusive", "--log", "logs/train-%j.out",
                    "--sbatch-arg", "--mail-type=END,FAIL", "--sbatch-arg=--gres=gpu:a100:2",
                    "--sbatch-arg=--gpus=2", "--sbatch-arg=--hold", "--dry-run", "--", *TRAINER, cwd=tmp_path))
    assert directives(proc.stdout) == [
        "#SBATCH --job-name=dptoolkit", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --output=logs/train-%j.out", "#SBATCH --account=proj-1", "#SBATCH --qos=high",
        "#SBATCH --mem=16G", "#SBATCH --cpus-per-task=4", "#SBATCH --constraint=a100&[rack1|rack2]",
        "#SBATCH --exclusive", "#SBATCH --mail-type=END,FAIL", "#SBATCH --gres=gpu:a100:2", "#SBATCH --gpus=2",
        "#SBATCH --hold"]
    assert proc.stderr == "" and not list(tmp_path.iterdir())


def test_output_is_a_deprecated_alias_of_log(tmp_path):
    proc = ok(slurm("--output", "old-%j.out", "--dry-run", "--", "true", cwd=tmp_path))
    assert "#SBATCH --output=old-%j.out" in directives(proc.stdout)
    assert proc.stderr.splitlines() == ["warning: --output is deprecated; use --log"]
    # A bad value is named as the user spelled the flag.
    proc = slurm("--output", "a b", "--dry-run", "--", "true", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("error: --output 'a b': contains a space")


def _requeue_script(tmp_path, *args, command=("python", "-m", "trainer", "--init", "base", "--out", "run")):
    script = ok(slurm("--requeue", *args, "--dry-run", "--", *command, cwd=tmp_path)).stdout
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the script parses
    return script


@pytest.mark.parametrize("mode, stop", [("srun", 'scancel --signal=TERM "$SLURM_JOB_ID"'),
                                        ("horovodrun", 'kill -TERM "$step"')])
def test_requeue_traps_the_signal_and_resumes_the_run(tmp_path, mode, stop):
    script = _requeue_script(tmp_path, "--mode", mode, "--time", "1-00:00:00")
    assert directives(script)[-3:] == ["#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                                       "#SBATCH --open-mode=append"]
    assert "trap requeue USR1" in script and f"    {stop} 2>/dev/null || true" in script
    launcher = "srun --mpi=pmix" if mode == "srun" else 'horovodrun --gloo -np 1 -H "$HOSTS"'
    # The requeued run continues --out; --init goes, as the trainer refuses it with --resume.
    assert f"    {launcher} python -m trainer --out run --resume &" in script
    assert f"    {launcher} python -m trainer --init base --out run &" in script


def test_requeue_of_another_command_runs_it_again_as_it_is(tmp_path):
    script = _requeue_script(tmp_path, "--signal", "SIGUSR2@300", command=("./train.sh", "--resume-from", "x"))
    assert "#SBATCH --signal=B:USR2@300" in directives(script) and "trap requeue USR2" in script
    assert script.count("    srun --mpi=pmix ./train.sh --resume-from x &") == 2


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-task", "0"], "--cpus-per-task 0: must be at least 1"),
    (["--mem", "4GB"], "--mem 4GB: expected a size per node like 4000M, 16G or 1T"),
    (["--mem", "-1"], "--mem -1: expected a size per node"),
    (["--account", "a b"], "--account 'a b': contains a space, which an #SBATCH line cannot carry safely"),
    (["--qos", "hi\n#SBATCH --nodes=64"], "--qos 'hi\\n#SBATCH --nodes=64': contains a control character '\\n'"),
    (["--constraint", "a100#x"], "--constraint 'a100#x': contains '#'"),
    (["--sbatch-arg", "-N4"], "--sbatch-arg -N4: expected --name=value or --flag"),
    (["--sbatch-arg", "--comment=two words"], "--sbatch-arg '--comment=two words': contains a space"),
    (["--sbatch-arg", "--export=ALL,X=$(id)"], "--sbatch-arg '--export=ALL,X=$(id)': contains '$'"),
    (["--sbatch-arg", "--mail-type=END\n#SBATCH --nodes=9"], "contains a control character '\\n'"),
    (["--sbatch-arg", "--ntasks-per-node=8"],
     "--sbatch-arg --ntasks-per-node=8: not allowed, launch slurm sets it: use its --ntasks-per-node"),
    (["--sbatch-arg", "--outp=/etc/motd"],
     "--sbatch-arg --outp=/etc/motd: not allowed, it abbreviates --output: launch slurm sets it: use its --log"),
    (["--sbatch-arg", "--wrap=id"], "not allowed, the job's command goes after --"),
    (["--sbatch-arg", "--array=0-3"], "not allowed, every task of an array would run the same command"),
    (["--sbatch-arg", "--comment=a", "--sbatch-arg", "--comment=b"], "--comment is given twice; give it once"),
    (["--mem", "1G", "--sbatch-arg", "--mem-per-cpu=1G"], "not allowed, it contradicts --mem; give one of them"),
    (["--requeue", "--sbatch-arg", "--open-mode=truncate"], "not allowed, --requeue appends each run to the log"),
    (["--signal", "USR1@60"], "--signal USR1@60: only with --requeue"),
    (["--requeue", "--signal", "KILL@60"], "--signal KILL@60: expected [USR1|USR2@]SECONDS"),
    (["--requeue", "--signal", "USR1@0"], "--signal USR1@0: the seconds must be 1 to 65535"),
    (["--requeue", "--time", "1", "--signal", "USR1@40"],
     "--signal USR1@40: Slurm sends it up to 30 s early, so with --time 1 (60 s) the job would be stopped before "
     "it starts working; give at most 29 s or a longer --time"),
    (["--requeue", "--time", "2"], "--signal USR1@120: Slurm sends it up to 30 s early"),
    (["--output", "a.out", "--log", "b.out"], "--output a.out and --log b.out: --output is --log's old name"),
    (["--out", "run"], "--out: launch slurm has no such flag; the trainer's --out RUN_DIR goes after --"),
    (["-o", "run"], "-o: launch slurm has no such flag"),
])
def test_refused_with_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, args, message):
    from launch.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", *args, "--dry-run", "--", "true"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and lines[-1].startswith("error: ") and message in lines[-1], err
    assert len(lines) == 1 or lines[0] == "warning: --output is deprecated; use --log"


def test_requeue_needs_the_trainers_out(tmp_path, capsys, monkeypatch):
    from launch.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--requeue", "--dry-run", "--", "python", "-m", "trainer", "--epochs", "2"]) == 2
    assert capsys.readouterr().err == ("error: --requeue: the trainer command has no --out, so each requeued run "
                                       "would start a new run directory; give --out RUN_DIR after --\n")


def test_a_log_that_shrinks_is_read_again_from_its_start(tmp_path):
    import io

    from launch.slurm import _stream
    log, out = tmp_path / "slurm-1.out", io.StringIO()
    log.write_text("run 1: a long first run\n")
    offset = _stream(log, 0, out)
    log.write_text("run 2\n")  # requeued by an admin, on a cluster that truncates logs
    _stream(log, offset, out)
    assert out.getvalue() == "run 1: a long first run\nrun 2\n"
