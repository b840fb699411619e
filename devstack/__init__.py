"""Local services for the demo, the tests and the benchmarks: real redis-server, moto's S3
server, real worker processes. Not part of the installed package."""
