from d3fast.cli import main

main()
