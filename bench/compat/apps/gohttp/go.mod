module herdcompat/gohttp

go 1.19
