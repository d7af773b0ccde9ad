"""`serval advise`: add_advise_parser registers it on a subparsers object."""
from __future__ import annotations

import argparse
import json
import sys


def run_advise(args) -> int:
    from serval.advise.advisor import advise, format_advice
    from serval.advise.requirements import Requirements
    from serval.bench.metrics import parse_slo
    try:
        overrides = dict(hardware=args.hardware, gpu_hour_price=args.gpu_hour_price, peak_rate=args.peak_rate,
                         slo_attainment=args.slo_attainment, max_context=args.max_context, modality=args.modality,
                         quantization=args.quantization, compliance=args.compliance,
                         slo_ms={k: v * 1000.0 for k, v in parse_slo(args.slo).items()} if args.slo else None)
        if args.requirements:
            requirements = Requirements.from_yaml(args.requirements, **overrides)
        else:
            requirements = Requirements(**{k: v for k, v in overrides.items() if v is not None})
        advice = advise(requirements, args.results)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(advice, handle, indent=2)
    sys.stdout.write(format_advice(advice))
    return 0


def add_advise_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("advise", help="recommend an engine from requirements and bench results")
    parser.add_argument("results", nargs="+", help="result directories of serval bench serve --result-dir")
    parser.add_argument("--requirements", default=None, help="YAML file with the fields below (flags override it)")
    parser.add_argument("--hardware", default=None, help="nvidia, amd, intel, cpu, tpu, ascend")
    parser.add_argument("--gpu-hour-price", type=float, default=None)
    parser.add_argument("--peak-rate", type=float, default=None, help="requests/s at peak")
    parser.add_argument("--slo", default=None, help="ttft=MS,tpot=MS,e2e=MS (default: each run's own)")
    parser.add_argument("--slo-attainment", type=float, default=None)
    parser.add_argument("--max-context", type=int, default=None)
    parser.add_argument("--modality", default=None, choices=("text", "image", "audio"))
    parser.add_argument("--quantization", action="append", default=None, help="wished format, repeatable")
    parser.add_argument("--compliance", action="append", default=None, choices=("guardrails", "audit"))
    parser.add_argument("--output-json", default=None)
    parser.set_defaults(func=run_advise)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serval")
    add_advise_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["advise", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)
