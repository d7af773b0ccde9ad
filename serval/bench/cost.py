"""Cost per token from a GPU-hour price and a measured throughput.

$ per 1M tokens = gpu_hour_price * num_gpus / (tokens_per_second * 3600) * 1e6.
Real prices are cents to a few dollars per 1M tokens; $0.10 *per token* would be 10^4-10^6 times too high.
"""
from __future__ import annotations

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12


def dollars_per_million(tokens_per_second: float, gpu_hour_price: float, num_gpus: int) -> float | None:
    if tokens_per_second <= 0:
        return None  # nothing served: no finite price
    return gpu_hour_price * num_gpus / (tokens_per_second * 3600.0) * 1e6


def run_cost(summary: dict, gpu_hour_price: float | None, num_gpus: int) -> dict | None:
    """Costs of one run: at its measured throughput and at its SLO-meeting (goodput) throughput."""
    if gpu_hour_price is None:
        return None
    if gpu_hour_price < 0 or num_gpus < 1:
        raise ValueError(f"invalid cost inputs: --gpu-hour-price {gpu_hour_price}, --num-gpus {num_gpus}; "
                         "allowed: price >= 0, gpus >= 1")
    return {
        "gpu_hour_price": gpu_hour_price, "num_gpus": num_gpus,
        "usd_per_1m_output_tokens": dollars_per_million(summary["output_throughput"], gpu_hour_price, num_gpus),
        "usd_per_1m_total_tokens": dollars_per_million(summary["total_token_throughput"], gpu_hour_price, num_gpus),
        "usd_per_1m_output_tokens_at_slo": dollars_per_million(
            summary["good_output_throughput"], gpu_hour_price, num_gpus),
        "usd_per_1m_total_tokens_at_slo": dollars_per_million(
            summary["good_total_token_throughput"], gpu_hour_price, num_gpus),
    }
