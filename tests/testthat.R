library(testthat)
library(fedagg)

test_check("fedagg")
