"""Report card: every stage logs a markdown section; `generate` assembles report.md.

Sections live as files under <base>/report/ (or NANOCHAT_REPORT_DIR), so stages run by different
processes (and re-runs) simply overwrite their own section.
"""

import datetime
import os
import platform
import re
import subprocess
import sys

from nanochat.common import get_base_dir, write_atomic
from nanochat.stage import STAGES

# order of sections in the final report: each stage's training, then its evaluation; unknown sections follow
SECTION_ORDER = ["Environment", "Tokenizer training", "Tokenizer evaluation"] + [
    title for s in STAGES.values()
    for title in (s.section, "Base model evaluation" if s.name == "base" else f"Chat evaluation {s.name}")]
# metrics pulled into the summary table: (section, key)
SUMMARY_KEYS = ["val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + (" (dirty)" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment():
    import torch
    lines = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "git commit": git_commit(),
             "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
             "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        lines["gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        lines["gpus"] = "none (CPU)"
    return lines


def _format(item):
    if isinstance(item, str):
        return item + "\n"
    lines = []
    for k, v in item.items():
        if isinstance(v, float):
            v = f"{v:.6g}" if abs(v) < 1e6 else f"{v:,.0f}"
        elif isinstance(v, int) and abs(v) >= 10000:
            v = f"{v:,}"
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        """Write (overwrite) one section. data: list of dicts (rendered as key: value lines) or strings."""
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        body = f"## {section}\n\ntimestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n\n"
        body += "\n".join(_format(item) for item in data)
        return write_atomic(path, body)

    def sections(self):
        files = {f[:-3]: os.path.join(self.report_dir, f) for f in os.listdir(self.report_dir)
                 if f.endswith(".md") and f != "report.md"}
        ordered = [slugify(s) for s in SECTION_ORDER if slugify(s) in files]
        ordered += sorted(s for s in files if s not in ordered)
        return [(s, open(files[s]).read()) for s in ordered]

    def generate(self):
        """Assemble report.md: environment header, a summary table of headline metrics, every section."""
        sections = self.sections()
        summary = {}
        for slug, text in sections:
            for key in SUMMARY_KEYS:
                m = re.search(rf"^- {re.escape(key)}: ([-0-9.eE]+)$", text, flags=re.M)
                if m:
                    summary.setdefault(key, {})[slug] = m.group(1)
        out = ["# nanochat-diloco report\n", _format(environment())]
        if summary:
            stages = sorted({s for v in summary.values() for s in v}, key=[s for s, _ in sections].index)
            out.append("## Summary\n")
            out.append("| metric | " + " | ".join(stages) + " |")
            out.append("|---|" + "---|" * len(stages))
            for key, vals in summary.items():
                out.append(f"| {key} | " + " | ".join(vals.get(s, "-") for s in stages) + " |")
            out.append("")
        out += [text for _, text in sections]
        path = os.path.join(self.report_dir, "report.md")
        return write_atomic(path, "\n".join(out))

    def reset(self):
        for f in os.listdir(self.report_dir):
            if f.endswith(".md"):
                os.remove(os.path.join(self.report_dir, f))


class _NullReport:
    """Non-master ranks log nothing."""

    def log(self, *args, **kwargs):
        pass

    def generate(self):
        pass

    def reset(self):
        pass


def get_report():
    if int(os.environ.get("RANK", 0)) != 0:
        return _NullReport()
    return Report(os.environ.get("NANOCHAT_REPORT_DIR") or os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Assemble (generate) or clear (reset) the report card")
    parser.add_argument("command", choices=["generate", "reset"])
    args = parser.parse_args()
    report = get_report()
    if args.command == "generate":
        print(f"wrote {report.generate()}")
    else:
        report.reset()
        print("report sections cleared")
