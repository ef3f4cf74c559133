"""A training run: its typed configuration (``config``), the loop (``trainer``), one step's gradient (``step``),
scoring over all ranks (``evaluation``), what a checkpoint holds and how a run resumes (``checkpoint``,
``runstate``), the run folder and its metrics (``rundir``), what rank 0 shows (``progress``) and live recovery
when a rank is lost (``shrink``).

May import ``system``, ``dist``, ``model`` and ``data``; never ``inference`` or a command line."""
