"""What a run reports: metrics (metrics.jsonl, TensorBoard, wandb), the progress line, sample tables.

    logger = MetricsLogger(cfg.trainer.output_dir, cfg.logger, rank, run_config=cfg)
    logger.log(step, {"train/loss": 2.31, "train/lr": 1e-5})
    bar = ProgressBar(total_steps, initial_step, enabled=rank == 0 and cfg.logger.progress_bar,
                      interval=cfg.logger.log_interval)
    bar.update(step, loss=2.31, lr=1e-5, tokens_per_sec=5400.0)
    bar.write(format_sample_table([("What is 2+2?", "4")]))
"""
from aligner.logging.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, config_as_dict
from aligner.logging.progress import ProgressBar, format_duration
from aligner.logging.samples import SAMPLES_DIR, format_sample_table, save_samples

__all__ = [
    "METRICS_FILE", "SAMPLES_DIR", "TENSORBOARD_DIR", "MetricsLogger", "ProgressBar", "config_as_dict",
    "format_duration", "format_sample_table", "save_samples",
]
