from pgbatch.cli import main

main()
