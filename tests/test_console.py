"""What raydist prints: Ray's known noise dropped (and nothing else), progress inside long epochs, the
study's event lines and status line, and every command's --help. No Ray cluster here."""

import io
import re
import time

import pytest

from raydist.output import console

# Lines as Ray 2.60 forwarded them from a TorchTrainer run's controller (captured 2026-12-02).
DEPRECATION = ("/venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436: "
               "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed after "
               "January 2027. Use `ExecutionOptions.label_selector` to constrain Ray Data work to labeled nodes.")
SOURCE_LINE = "  self.exclude_resources = exclude_resources"
PREEMPTION = ("[2026-12-02 02:15:01,381 E 23084 23112] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
              "and ID: '3521ab651f52773d645a66ae01000000' has constructor arguments in the object store and "
              "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
              "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def test_rays_known_noise_is_dropped_and_nothing_else():
    real_warning = "/my/code.py:3: UserWarning: the learning rate is very high"
    other_actor = PREEMPTION.replace("PreemptionWatcher", "MyActor")  # the same notice for the user's own actor
    lines = ["epoch   1/15  train loss 2.2792", DEPRECATION, SOURCE_LINE, PREEMPTION, real_warning,
             "  warnings.warn('the learning rate is very high')", other_actor, "Traceback (most recent call last):"]
    assert console.without_ray_noise(lines) == [
        "epoch   1/15  train loss 2.2792", real_warning, "  warnings.warn('the learning rate is very high')",
        other_actor, "Traceback (most recent call last):"]
    # the source line goes only with its warning: an indented line after anything else stays
    assert console.without_ray_noise([PREEMPTION, SOURCE_LINE]) == [SOURCE_LINE]


# What a trial's process printed when Ray stopped it (SIGTERM) inside a garbage-collector callback; captured
# from a study's worker log, 2026-12-06 (a quiet study's console showed it once in a cluster-tier run).
SIGTERM_BLOCK = [
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7ff6cb3325c0>",
    "Traceback (most recent call last):",
    '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/_weakrefset.py", line 39, in _remove',
    "    def _remove(item, selfref=ref(self)):",
    "",
    '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
    "    raise_sys_exit_with_custom_error_message(",
    '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
    "SystemExit: 1",
]


def test_the_systemexit_rays_sigterm_handler_raises_in_a_stopping_process_is_dropped_and_nothing_else():
    before, after = "epoch   2/2  train loss 0.31", "trial done"
    assert console.without_ray_noise([before, *SIGTERM_BLOCK, after]) == [before, after]
    # the same shape from the user's own code (no Ray SIGTERM frame), or cut off mid-block, stays whole
    own = [line.replace("ray/_private/worker.py", "my/worker.py") for line in SIGTERM_BLOCK]
    assert console.without_ray_noise(own) == own
    assert console.without_ray_noise(SIGTERM_BLOCK[:-1]) == SIGTERM_BLOCK[:-1]
    other_exit = SIGTERM_BLOCK[:5] + ['  File "/my/code.py", line 3, in stop', "SystemExit: 1"]
    assert console.without_ray_noise(other_exit) == other_exit
    # a block of the user's own just before Ray's is kept whole; Ray's after it still goes
    user_block = ["Exception ignored in: <function Loader.__del__ at 0x7f01>", "Traceback (most recent call last):",
                  '  File "/my/data.py", line 9, in __del__', "ValueError: closed twice"]
    assert console.without_ray_noise(user_block + SIGTERM_BLOCK) == user_block


def test_the_token_notice_of_rays_driver_is_matched_and_its_opt_out_notice_is_not():
    assert console.RAY_DRIVER_NOISE.search("Token authentication is enabled for this Ray cluster. Set "
                                           "RAY_AUTH_MODE=disabled to opt out.")
    assert not console.RAY_DRIVER_NOISE.search("Token authentication is disabled for this Ray cluster. Anyone with "
                                               "network access to the cluster can run arbitrary code")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _progress(every_s, steps=400):
    clock, printed = Clock(), []
    progress = console.EpochProgress(epoch=3, epochs=15, steps=steps, images_per_step=128, every_s=every_s,
                                     clock=clock, out=printed.append)
    return progress, clock, printed


def test_a_long_epoch_says_how_far_it_is_every_30_seconds_in_a_log():
    progress, clock, printed = _progress(every_s=30)
    for step in range(400):  # 0.25 s a step: a 100 s epoch
        clock.now = 1000.0 + step * 0.25
        progress.step(step)
    assert len(printed) == 3  # at 30, 60 and 90 s
    first = printed[0]
    assert first.startswith(console.PROGRESS_MARK)
    assert "epoch 3/15" in first and "step 120/400" in first and " 30%" in first
    assert "512 img/s" in first  # 120 steps x 128 images in 30 s
    assert "ETA 1m10s" in first  # 280 steps left at 0.25 s


def test_a_short_epoch_prints_nothing_and_a_terminal_gets_a_line_each_second_after_5_seconds():
    progress, clock, printed = _progress(every_s=30, steps=16)
    for step in range(16):  # 4 s in all
        clock.now = 1000.0 + step * 0.25
        progress.step(step)
    assert printed == []
    progress, clock, printed = _progress(every_s=1.0)
    for step in range(40):  # 0.25 s a step: 10 s
        clock.now = 1000.0 + step * 0.25
        progress.step(step)
    assert len(printed) == 5  # at 5, 6, 7, 8 and 9 s
    progress, clock, printed = _progress(every_s=0)  # off
    clock.now += 100
    progress.step(10)
    assert printed == []


def test_the_live_bar_redraws_in_place_and_is_cleared_before_other_lines():
    out = io.StringIO()
    bar = console.LiveBar(out)
    bar.show(f"{console.PROGRESS_MARK} epoch 1/2 [#...] 5%")
    bar.show(f"{console.PROGRESS_MARK} epoch 1/2 [##..] 10%")
    bar.clear()
    bar.clear()  # once only
    assert out.getvalue() == "\r\x1b[Kepoch 1/2 [#...] 5%\r\x1b[Kepoch 1/2 [##..] 10%\r\x1b[K"


def test_trial_lines_say_the_event_the_values_and_the_outcome():
    assert console.trial_started_line("ab12", {"lr": 0.123456, "batch_size": 64}, "1 worker x 1 CPU") == \
        "trial ab12 started: lr=0.1235 batch_size=64  (1 worker x 1 CPU)"
    line = console.trial_epoch_line("ab12", {"epoch": 3, "val_acc": 0.5, "train_loss": 1.25, "epoch_time_s": 2.04},
                                    epochs=10, metric="val_acc", best=0.6)
    assert line == "trial ab12 epoch   3/10  val_acc 50.00% (best 60.00%)  train_loss 1.2500  2.0s"
    stopped = console.trial_ended_line("ab12", status="stopped early", epochs_run=3, epochs=10, metric="val_acc",
                                       best=0.6, best_epoch=2, seconds=75, rung=3)
    assert stopped == "trial ab12 stopped early by ASHA at the epoch-3 rung (3/10 epochs, best val_acc 60.00% at epoch 2, 1m15s)"
    failed = console.trial_ended_line("ab12", status="error", epochs_run=1, epochs=10, metric="val_acc", best=None,
                                      best_epoch=None, seconds=None, reason="out of memory on cuda:0")
    assert failed == "trial ab12 failed: out of memory on cuda:0 (after 1/10 epochs)"
    assert [console.report_every(e) for e in (1, 10, 20, 21, 100)] == [1, 1, 1, 2, 5]


def test_the_status_line_counts_trials_names_the_best_and_estimates_what_is_left():
    # one running trial without an epoch yet (10 s in: the mean's 40 s left), one at epoch 3 of 10 after 45 s
    remaining = console.remaining_estimate(finished_durations=[40.0, 60.0], running=[(10.0, 0, 10), (45.0, 3, 10)],
                                           not_started=2, concurrency=2)
    assert remaining == pytest.approx((40 + 45 * 7 / 3 + 2 * 50) / 2)
    assert console.remaining_estimate(finished_durations=[], running=[(5.0, 1, 4)], not_started=3, concurrency=1) is None
    line = console.study_status_line(elapsed_s=95, running=2, pending=3, done=3, total=8,
                                     best=("ab12", 0.9694, {"lr": 2.184}), metric="val_acc", remaining_s=72.5)
    assert line == "[1m35s] trials: 2 running, 3 pending, 3/8 done  | best ab12 val_acc 96.94% (lr=2.184)  | about 1m12s left"


@pytest.mark.parametrize("command", ["train", "tune", "cluster", "scaling"])
def test_every_commands_help_starts_with_what_it_does_and_an_example(command):
    if command == "train":
        from raydist.cli import TRAIN_DESCRIPTION, build_parser

        text = build_parser("raydist.train", TRAIN_DESCRIPTION).format_help()
    else:
        import importlib

        text = importlib.import_module(f"raydist.{command}").build_parser().format_help()
    first = text.splitlines()[0]
    assert not first.startswith("usage") and len(first.split()) >= 8  # a sentence of what it does
    example = text.index("example:\n  python -m raydist.")
    assert example < text.index("usage:")
    if command == "train":  # the flags are still grouped as the config is
        assert "data:" in text or "model:" in text


def test_rays_log_forwarding_in_this_driver_drops_the_noise_and_draws_progress_as_a_bar(ray_cluster, capsys,
                                                                                          monkeypatch):
    """Through Ray's own forwarding handler of a connected driver: what a worker printed reaches the console
    less Ray's known noise, and on a terminal a progress line is drawn in place, cleared before the next line."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raydist.ray_edge import session

    session.filter_worker_output()
    session.filter_worker_output()  # twice: still one filter
    assert [name for name, _ in dispatcher.handlers].count("ray_print_logs") == 1
    bar = io.StringIO()
    monkeypatch.setattr(session, "LIVE_BAR", console.LiveBar(bar))

    def emit(*lines):
        dispatcher.emit({"pid": 4242, "ip": "127.0.0.1", "is_err": False, "job": "", "lines": list(lines),
                         "actor_name": "RayTrainWorker", "task_name": "", "localhost": "127.0.0.1"})

    progress = f"{console.PROGRESS_MARK} epoch 2/15 [##...] 10%  step 40/400"
    emit("epoch   1/15  train loss 2.2792", DEPRECATION, SOURCE_LINE, PREEMPTION, progress)
    emit("epoch   2/15  train loss 1.8433")
    out = capsys.readouterr().out
    assert "epoch   1/15  train loss 2.2792" in out and "epoch   2/15  train loss 1.8433" in out
    assert "exclude_resources" not in out and "PreemptionWatcher" not in out and "progress:" not in out
    assert bar.getvalue() == "\r\x1b[Kepoch 2/15 [##...] 10%  step 40/400\r\x1b[K"  # drawn, then cleared

    monkeypatch.setattr(session, "LIVE_BAR", None)  # not a terminal: the progress line is printed as it is
    emit(progress)
    assert progress in capsys.readouterr().out
    # Ray's prefix (coloured on a terminal) was on every line so far: that is what --verbose keeps
    emit("epoch   3/15  train loss 1.5")
    assert re.search(r"\(RayTrainWorker pid=4242\)\S* epoch   3/15  train loss 1.5", capsys.readouterr().out)


def test_raydist_train_prints_the_runs_own_lines_without_rays_prefix(ray_cluster, capsys, monkeypatch):
    """raydist.train's console (connect(bare_run_lines=True)): what the training workers print to stdout
    reaches it as a script's output would, no `(RayTrainWorker pid=...)` prefix and no colour codes; their
    stderr and every other process's lines keep Ray's prefix, so a warning still says where it came from."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raydist.ray_edge import session

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # colours on, as on a terminal: the run's lines drop them too
    session.filter_worker_output(bare_run_lines=True)
    try:
        assert [name for name, _ in dispatcher.handlers].count("ray_print_logs") == 1

        def emit(line, *, actor="RayTrainWorker", is_err=False, pid=4242):
            dispatcher.emit({"pid": pid, "ip": "127.0.0.1", "is_err": is_err, "job": "", "lines": [line],
                             "actor_name": actor, "task_name": "", "localhost": "127.0.0.1"})

        emit("epoch   1/15  train loss 2.2792")
        emit("data: digits ready in /data on node 5b1d")
        emit("/my/model.py:3: UserWarning: rank 1 saw a NaN", is_err=True)
        emit("the controller says hello", actor="TrainController")
        captured = capsys.readouterr()
        out_lines = captured.out.splitlines()
        assert "epoch   1/15  train loss 2.2792" in out_lines and "data: digits ready in /data on node 5b1d" in out_lines
        assert "\x1b[" not in "\n".join(line for line in out_lines if "epoch" in line or "data:" in line)
        assert re.search(r"\(RayTrainWorker pid=4242\)\S* /my/model.py:3: UserWarning: rank 1 saw a NaN", captured.err)
        assert re.search(r"\(TrainController pid=4242\)\S* the controller says hello", captured.out)

        # Ray's deduplication holds back a line another process already printed, and lets it out with whatever
        # batch comes after its 5 s window: each printed batch is judged by its own source
        from ray._private.ray_logging import stdout_deduplicator

        clock = [time.time()]
        monkeypatch.setattr(stdout_deduplicator, "timesource", lambda: clock[0])
        emit("the controllers restart the worker group", actor="TrainController", pid=5001)
        emit("the controllers restart the worker group", actor="TrainController", pid=5002)  # held back
        clock[0] += 10
        emit("epoch   4/15  train loss 0.9871", pid=4242)  # the run's batch, which lets the held line out
        out = capsys.readouterr().out
        assert "epoch   4/15  train loss 0.9871" in out.splitlines()
        held = re.findall(r"\(TrainController pid=(500\d)\)\S* the controllers restart the worker group", out)
        assert held == ["5001", "5002"], out
    finally:
        session.filter_worker_output()  # as the session's other tests expect it: every line as Ray prints it
    emit("epoch   2/15  train loss 1.8")
    assert re.search(r"\(RayTrainWorker pid=4242\)\S* epoch   2/15  train loss 1.8", capsys.readouterr().out)


def test_a_run_starts_with_a_few_lines_saying_its_peak_lr_not_a_90_field_config_line(tmp_path, capsys, monkeypatch):
    """raydist.train printed `config: ` and about 90 fields on one line, and --lr's value as if it were the
    LR; now: data, model, workers, device and precision; the global batch and the peak LR the loop reaches;
    what differs from the defaults; where the whole config is."""
    from cli import run_main

    from raydist.cli import parse_cli

    cfg, _, _ = parse_cli(["--preset", "horovod-resnet18", "--num-workers", "4", "--name", "h", "--storage-path",
                           str(tmp_path)])
    lines = console.run_start_lines(cfg)
    assert lines[0] == "run h: cifar10, resnet18, 4 worker(s) on GPUs if the cluster has them, else CPUs, fp32"
    assert lines[1].startswith("  global batch 1024 (4 x 256); peak LR 0.4 (--lr 0.1 per worker batch), warmup 5 "
                               "epoch(s), step schedule, 50 epochs")
    assert "lr_scaling=per_worker" in lines[2] and "storage_path" not in lines[2]
    assert lines[3] == f"  the whole config: {tmp_path}/h/config.yaml"

    code, out, _ = run_main("raydist.train", ["--epochs", "3", "--lr", "0.2", "--num-workers", "2", "--name", "d",
                                              "--storage-path", str(tmp_path)], capsys, monkeypatch)
    assert code == 1  # it went on to start a cluster, which this test does not allow
    assert not [line for line in out.splitlines() if line.startswith("config: ")] and out.splitlines()[:2] == [
        "run d: digits, resnet8, 2 worker(s) on GPUs if the cluster has them, else CPUs, bf16 (fp16 on GPUs "
        "before compute capability 8.0) on GPU, fp32 on CPU",
        "  global batch 128 (2 x 64); peak LR 0.1 (--lr 0.2 per 256 images), warmup 1 epoch(s), cosine schedule, "
        "3 epochs"]
