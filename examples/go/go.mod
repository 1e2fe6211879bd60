module miehisto/examples/go

go 1.19
