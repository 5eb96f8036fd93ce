"""What the commands do, one module each, top to bottom: `prepare`, `experts`, `distill` (a
run, or every subtask of a split and their merge), `subtasks` (`d3fast merge`), `evaluate`,
`label`, `export` (export and sample), `profile`. `d3fast/cli.py` and `d3fast/api.py` are two
faces over them: each command resolves its flags and calls one recipe."""
