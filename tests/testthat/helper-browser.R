# A real browser for the tests: Debian's headless Chromium driven through
# ChromeDriver's WebDriver protocol (W3C), so that a test can wait for an
# element to show a value instead of guessing how long a page takes. The
# driver listens on loopback; it and the browser are stopped when the
# calling test ends, pass or fail. Every wait is bounded.

browser_session <- function(env = parent.frame()) {
  driver <- Sys.which("chromedriver")
  browser <- Sys.which("chromium")
  if (!nzchar(driver) || !nzchar(browser)) skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
  skip_if_not_installed("curl")
  skip_if_not_installed("processx")
  skip_if_not_installed("jsonlite")
  port <- httpuv::randomPort(host = "127.0.0.1")
  proc <- processx::process$new(driver, c(sprintf("--port=%d", port), "--allowed-ips=127.0.0.1"),
                                stdout = NULL, stderr = NULL, cleanup = TRUE)
  withr::defer(if (proc$is_alive()) proc$kill(), envir = env)
  base <- sprintf("http://127.0.0.1:%d", port)
  call <- function(method, path, body = NULL) {
    h <- curl::new_handle(customrequest = method, timeout = 60)
    if (!is.null(body)) {
      curl::handle_setopt(h, postfields = as.character(jsonlite::toJSON(body, auto_unbox = TRUE)))
      curl::handle_setheaders(h, "Content-Type" = "application/json")
    }
    res <- curl::curl_fetch_memory(paste0(base, path), handle = h)
    jsonlite::fromJSON(rawToChar(res$content), simplifyVector = FALSE)$value
  }
  for (i in 1:100) {
    ok <- tryCatch(isTRUE(call("GET", "/status")$ready), error = function(e) FALSE)
    if (ok) break
    Sys.sleep(0.1)
  }
  user_dir <- withr::local_tempdir(.local_envir = env)
  opts <- list(binary = unname(browser),
               args = list("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--disable-dev-shm-usage", paste0("--user-data-dir=", user_dir), "--window-size=1280,1000"))
  id <- call("POST", "/session", list(capabilities = list(alwaysMatch = list(browserName = "chrome", `goog:chromeOptions` = opts))))$sessionId
  if (is.null(id)) stop("ChromeDriver did not start a browser session")
  s <- paste0("/session/", id)
  withr::defer(try(call("DELETE", s), silent = TRUE), envir = env, priority = "first")
  text_of <- function(selector) {
    el <- tryCatch(call("POST", paste0(s, "/element"), list(using = "css selector", value = selector)), error = function(e) NULL)
    ref <- if (is.list(el)) el[["element-6066-11e4-a52e-4f735466cecf"]]
    if (is.null(ref)) return(NA_character_)
    out <- call("GET", sprintf("%s/element/%s/text", s, ref))
    if (is.character(out)) out else NA_character_
  }
  list(
    open = function(url) invisible(call("POST", paste0(s, "/url"), list(url = url))),
    text = text_of,
    # Waits (at most `timeout` seconds) until `selector`'s text matches.
    wait_text = function(selector, pattern, timeout = 30) {
      end <- proc.time()[["elapsed"]] + timeout
      repeat {
        got <- text_of(selector)
        if (!is.na(got) && grepl(pattern, got)) return(got)
        if (proc.time()[["elapsed"]] > end) return(got)
        Sys.sleep(0.2)
      }
    },
    # Waits (at most `timeout` seconds) until `selector` is on the page.
    wait_present = function(selector, timeout = 30) {
      end <- proc.time()[["elapsed"]] + timeout
      repeat {
        if (!is.na(text_of(selector))) return(TRUE)
        if (proc.time()[["elapsed"]] > end) return(FALSE)
        Sys.sleep(0.2)
      }
    },
    source = function() call("GET", paste0(s, "/source")),
    screenshot = function(file) {
      writeBin(jsonlite::base64_dec(call("GET", paste0(s, "/screenshot"))), file)
      file
    }
  )
}
