"""Training: the hook-based loop, the default trainer and set-up, and multi-process launch."""
from . import hooks
from .defaults import DefaultTrainer, create_ddp_model, default_argument_parser, default_setup, resume_command
from .defaults import EVAL_SUBDIR, log_model, record_dir
from .defaults import add_import_argument, exit_on_user_error, import_user_modules, launch_from_command_line
from .hooks import HookBase
from .launch import launch
from .train_loop import AMPTrainer, SimpleTrainer, TrainerBase, backward_and_step

__all__ = ["AMPTrainer", "DefaultTrainer", "EVAL_SUBDIR", "HookBase", "SimpleTrainer", "TrainerBase",
           "add_import_argument", "backward_and_step", "create_ddp_model", "default_argument_parser", "default_setup",
           "exit_on_user_error", "hooks", "import_user_modules", "launch_from_command_line", "launch", "log_model",
           "record_dir", "resume_command"]
