"""Worker processes: several whole servers on one port, under a light supervisor.

``assignment`` splits the machine (cores, GPUs) between the workers, ``control`` is what
the supervisor and a worker say to each other, ``supervisor`` is the parent process and
``worker`` a worker's entry point.
"""

__all__: list[str] = []
