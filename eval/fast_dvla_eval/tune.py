"""``fast-dvla tune``: the speed/fidelity trade-off of a decoder's thresholds,
its Pareto front, and a recommendation a policy can keep.

    fast-dvla tune --data data/heldout_demos                      # open loop: tau_conf 0.1 ... 0.95
    fast-dvla tune --data D --tau-conf 0.3,0.5 --near-bins 0,3     # a product grid
    fast-dvla tune --data D --settings-file settings.yaml          # a list of settings
    fast-dvla tune --closed-loop libero --init-states 15-18 --shard 0/2   # success per setting, sharded
    fast-dvla tune --data D --confirm-init-states 27-34 --shard 1/2       # confirm on other episodes
    fast-dvla tune --data D --apply                                # keep the recommendation in the policy

Every setting runs on the same frames (open loop) or episodes (closed loop),
beside the teacher's vanilla decoding. Speed is the latency ratio to that
vanilla decoding timed alongside; fidelity is ``--metric`` (open loop: ``mae``
against the demonstrations by default; closed loop: ``success``, with a 95%
Wilson interval). The recommendation is the fastest setting whose drop
against the teacher stays within ``--max-drop`` (or, with ``--target-hz``
alone, the most faithful one that reaches that action rate).

Everything is saved under ``--out`` as it finishes: each open-loop setting's
row, each closed-loop episode (one journal per shard); a re-run with the
same arguments skips what is done. Shards run as separate processes, after
the open-loop sweep has run once on its own (its timings must not share the
machine); whichever shard finishes last writes the report from all of them,
and re-running any shard's command rewrites it. ``--confirm-init-states`` runs the recommendation, the policy's current
setting and the teacher on episodes the choice never saw, and reports both.
"""
from __future__ import annotations

import argparse
import os

import torch

from fast_dvla.benchmark.report import markdown_table, write_json
from fast_dvla.benchmark.stats import intervals_overlap
from fast_dvla.config import METHODS
from fast_dvla.data.frames import sample_frames
from fast_dvla.envs.journal import EpisodeJournal, read_journal
from fast_dvla.envs.rollout import libero_jobs
from fast_dvla.envs.sharding import parse_range, parse_shard
from fast_dvla.policy import FastDVLAPolicy, reference_policy_dir
from fast_dvla.tuning import METRICS, NoSettingMeets, TuneResult, current_setting, tune
from fast_dvla.tuning.apply import apply_setting
from fast_dvla.tuning.closed_loop import run_episodes, success_rows
from fast_dvla.tuning.grid import AXES, DEFAULT_TAU_CONF, parse_values, product_grid, read_settings_file, \
    setting_name, validated_configs
from fast_dvla.tuning.plot import pareto_plot
from fast_dvla.tuning.recommend import recommend
from fast_dvla.tuning.sweep import TEACHER_ROW

SUCCESS_COLUMNS = [("setting", "setting", "s"), ("episodes", "episodes", "d"), ("successes", "successes", "d"),
                   ("success_text", "success (95% interval)", "s"), ("nfe", "NFE/chunk", ".2f"),
                   ("query_tokens", "query tokens/chunk", ".0f"), ("latency_ms", "latency ms (median)", ".1f"),
                   ("speedup", "x vanilla", ".2f"), ("noise", "vs teacher", "s")]


def settings_from(args) -> list[dict]:
    if args.settings_file:
        return read_settings_file(args.settings_file)
    axes = {name: parse_values(name, getattr(args, name)) for name in AXES if getattr(args, name) is not None}
    axes.setdefault("tau_conf", list(DEFAULT_TAU_CONF))
    return product_grid(axes)


def load(path: str | None, role: str) -> FastDVLAPolicy:
    return FastDVLAPolicy.from_pretrained(path or reference_policy_dir(role))


def closed_loop(args, phase: str, named: dict, init_states: str) -> list[dict] | None:
    """This shard's episodes of ``phase``, resumed from its journal (which refuses other
    settings or episodes), then every shard's: ``None`` until all of them are done."""
    i, n = parse_shard(args.shard)
    journals = os.path.join(args.out, "closed_loop")
    arguments = {"phase": phase, "suite": args.suite, "tasks": args.tasks, "init_states": init_states,
                 "shards": n, "max_steps": args.max_steps, "policy": args.policy, "teacher": args.teacher,
                 "settings": {name: c.to_dict() for name, (_, c) in named.items()}}
    path = os.path.join(journals, f"{phase}.shard{i}of{n}.episodes.jsonl")
    with EpisodeJournal(path, arguments) as journal:
        done = {key: dict(entry["result"], setting=key[0], task=key[1], init=key[2])
                for key, entry in journal.episodes.items()}
        run_episodes(named, libero_jobs(args.suite, args.tasks, init_states, args.shard), args.suite,
                     args.max_steps, done, lambda e: journal.record(e["setting"], e["task"], e["init"], e))
    everything = {}
    for shard in range(n):
        everything.update(read_journal(os.path.join(journals, f"{phase}.shard{shard}of{n}.episodes.jsonl"))[1])
    jobs = libero_jobs(args.suite, args.tasks, init_states, "0/1")
    missing = [(s, t, k) for t, k in jobs for s in named if (s, t, k) not in everything]
    if missing:
        print(f"[tune] {phase}: {len(missing)} episodes still to run in other shards")
        return None
    return [everything[(s, t, k)]["result"] for t, k in jobs for s in named]


def with_noise_column(rows: list[dict]) -> list[dict]:
    teacher = next(r for r in rows if r["setting"] == TEACHER_ROW)
    out = []
    for r in rows:
        lo, hi = r["interval"]
        noise = "" if r is teacher else (
            "within noise" if intervals_overlap(r["interval"], teacher["interval"]) else "differs")
        out.append(dict(r, success_text=f"{r['successes']}/{r['episodes']} ({lo:.0%}-{hi:.0%})", noise=noise))
    return out


def report(args, result: TuneResult | None, search: list[dict] | None, recommendation: dict | None,
           refusal: str | None, confirm: list[dict] | None) -> None:
    metric = METRICS[args.metric or ("success" if search else "mae")]
    lines = [f"# Tuning `{args.method}` of {args.policy or 'the shipped reference student'}", ""]
    payload = {"method": args.method, "policy": args.policy, "teacher": args.teacher, "metric": metric.key,
               "max_drop": args.max_drop, "target_hz": args.target_hz, "recommendation": recommendation,
               "refusal": refusal}
    if result is not None:
        lines += [f"Open loop on {args.frames} frames of {args.data} (seed {args.seed}); speed on the first "
                  f"{args.timing_frames}, interleaved with the teacher's vanilla decoding. Current setting: "
                  f"`{result.current}`.", "", result.table(), ""]
        payload["open_loop"] = {"rows": result.rows, "front": result.front, "current": result.current}
    if search is not None:
        lines += [f"Closed loop, tasks {args.tasks} x initial states {args.init_states}:", "",
                  markdown_table(with_noise_column(search), SUCCESS_COLUMNS), ""]
        payload["closed_loop"] = search
    if recommendation:
        lines += [f"**Recommended:** `{recommendation['setting']}`: {metric.key} {recommendation['value']:.4g} "
                  f"(teacher {recommendation['teacher_value']:.4g}, drop {recommendation['drop']:.4g}), "
                  f"{recommendation['speedup']:.2f}x vanilla, {recommendation['action_hz']:.1f} action Hz; "
                  f"bound by {', '.join(recommendation['bound_by'])}"
                  + (f"; margin {recommendation['drop_margin']:.4g} in {metric.key}"
                     if recommendation["drop_margin"] is not None else "")
                  + (f", {recommendation['hz_margin']:.1f} action Hz" if recommendation["hz_margin"] is not None
                     else "")
                  + (" (within the noise of the episode count)" if recommendation.get("within_noise") else ""),
                  ""]
    if refusal:
        lines += [f"**No recommendation:** {refusal}", ""]
    if confirm is not None:
        lines += [f"Confirmation on other episodes, tasks {args.tasks} x initial states "
                  f"{args.confirm_init_states}:", "", markdown_table(with_noise_column(confirm), SUCCESS_COLUMNS), ""]
        payload["confirm"] = confirm
    text = "\n".join(lines)
    write_json(os.path.join(args.out, "tune.json"), payload)
    with open(os.path.join(args.out, "tune.md"), "w") as f:
        f.write(text)
    rows = (result.rows[1:] if result else None) or [r for r in (search or []) if r["setting"] != TEACHER_ROW]
    teacher = result.rows[0] if result else next((r for r in search or [] if r["setting"] == TEACHER_ROW), None)
    if rows and teacher and all(r.get(metric.key) is not None for r in rows):
        pareto_plot(rows, teacher, metric, os.path.join(args.out, "tune.png"),
                    current=result.current if result else None,
                    recommended=recommendation["setting"] if recommendation else None,
                    title=f"{args.method}: {metric.meaning}")
    print(text)
    print(f"wrote {args.out}/tune.json, tune.md" + (", tune.png" if rows else ""))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="the policy to tune (default: the shipped reference student)")
    p.add_argument("--teacher", help="the policy whose vanilla decoding is the reference (default: the shipped "
                   "reference teacher)")
    p.add_argument("--method", default="fast_dvla", choices=METHODS, help="the decoder to tune")
    p.add_argument("--data", help="recorded demonstrations: the open-loop sweep runs on frames drawn from them")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-frames", type=int, default=32, help="frames timed per setting")
    for name in AXES:
        p.add_argument(f"--{name.replace('_', '-')}", default=None, help="comma-separated values to sweep" + (
            f" (default {','.join(map(str, DEFAULT_TAU_CONF))})" if name == "tau_conf" else ""))
    p.add_argument("--settings-file", help="a YAML list of settings instead of the product grid")
    p.add_argument("--metric", choices=sorted(METRICS), help="default: success in closed loop, else mae")
    p.add_argument("--max-drop", type=float, help="largest drop of --metric against the teacher, in its units "
                   "(default per metric: " + ", ".join(f"{k} {m.default_max_drop:g}" for k, m in METRICS.items()) + ")")
    p.add_argument("--target-hz", type=float, help="action rate the setting must reach")
    p.add_argument("--closed-loop", choices=["libero"], help="also measure success per setting in closed loop")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="all")
    p.add_argument("--init-states", default="15-18", help="closed-loop search episodes")
    p.add_argument("--confirm-init-states", help="episodes the choice never saw, for the confirmation")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th episode from the i-th")
    p.add_argument("--apply", action="store_true", help="save the recommendation in the policy directory as "
                   "--method's settings")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="outputs/tune", help="folder for the saved rows, episodes and report")


def main(args) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.data and not args.closed_loop:
        raise SystemExit("nothing to measure: give --data (open loop) and/or --closed-loop libero")
    if args.metric == "success" and not args.closed_loop:
        raise SystemExit("--metric success needs --closed-loop")
    if args.apply and args.shard != "0/1":
        raise SystemExit("--apply: run it once, without --shard, after the shards are done")
    parse_range(args.init_states)
    try:
        settings = settings_from(args)
    except ValueError as e:
        raise SystemExit(str(e))
    policy, teacher = load(args.policy, "student"), load(args.teacher, "teacher")
    os.makedirs(args.out, exist_ok=True)
    result, search, recommendation, refusal, confirm = None, None, None, None, None
    if args.data:
        frames = sample_frames(args.data, args.frames, policy.model.config.horizon, args.seed)
        open_metric = args.metric if args.metric != "success" else None
        try:
            # shards run beside each other: the open-loop timings must come from a run of their own
            result = tune(policy, frames, teacher, settings, args.method, open_metric or "mae", args.max_drop,
                          args.target_hz, args.timing_frames, out=os.path.join(args.out, "open_loop"),
                          measure=parse_shard(args.shard)[1] == 1)
        except ValueError as e:
            raise SystemExit(f"tune: {e}")
        recommendation, refusal = result.recommendation, result.refusal
    if args.closed_loop:
        configs = validated_configs(policy.decode_config_for(args.method), settings)
        named = {TEACHER_ROW: (teacher, teacher.decode_config_for("vanilla"))}
        named.update({name: (policy, c) for name, c in configs.items()})
        episodes = closed_loop(args, "search", named, args.init_states)
        if episodes is not None:
            steps = {name: p.n_action_steps for name, (p, _) in named.items()}
            search = success_rows(episodes, TEACHER_ROW, steps)
            metric = METRICS[args.metric or "success"]
            teacher_row = next(r for r in search if r["setting"] == TEACHER_ROW)
            candidates = [dict(r, config=configs[r["setting"]].to_dict()) for r in search if r is not teacher_row]
            try:
                recommendation, refusal = recommend(candidates, teacher_row, metric, args.max_drop,
                                                    args.target_hz), None
            except NoSettingMeets as e:
                recommendation, refusal = None, str(e)
    if args.confirm_init_states and recommendation:
        current = setting_name(current_setting(policy, args.method, sorted({a for s in settings for a in s})))
        base = policy.decode_config_for(args.method)
        named = {TEACHER_ROW: (teacher, teacher.decode_config_for("vanilla")),
                 f"recommended: {recommendation['setting']}": (policy, base.replace(**{
                     k: v for k, v in recommendation["config"].items() if k != "method"}))}
        named.setdefault(f"current: {current}", (policy, base))
        if recommendation["setting"] == current:
            named = {k: v for k, v in named.items() if not k.startswith("current")}
        episodes = closed_loop(args, "confirm", named, args.confirm_init_states)
        if episodes is not None:
            confirm = success_rows(episodes, TEACHER_ROW, {name: p.n_action_steps for name, (p, _) in named.items()})
    report(args, result, search, recommendation, refusal, confirm)
    if refusal:
        raise SystemExit(f"tune: no recommendation: {refusal}")
    if args.apply:
        if not recommendation:
            raise SystemExit(f"--apply: nothing to apply ({refusal})")
        path = args.policy or reference_policy_dir("student")
        apply_setting(path, args.method, recommendation["config"])
        print(f"[tune] saved {recommendation['setting']} as {args.method}'s settings in {path}/config.json")
