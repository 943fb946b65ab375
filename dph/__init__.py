"""dph: RL fine-tuning of LLMs with mass-covering f-divergences (DPH-RL), as experiment orchestration."""

__version__ = "0.1.0"
