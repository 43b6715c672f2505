// Command credproxy is a transparent credential-injecting proxy: apps connect
// without secrets, credproxy logs in upstream with credentials it fetches.
//
// This file only parses the command line, wires the protocols into the
// engine, wires signals and maps outcomes to exit codes: 0 clean stop, 1
// bad config or start-up failure, 2 usage error.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/protocols/httpproxy"
	"github.com/credproxy/credproxy/protocols/postgres"
	"github.com/credproxy/credproxy/proxy"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `usage:
  credproxy run --config FILE        run the proxy (also: credproxy --config FILE)
  credproxy validate --config FILE   check a config; every problem, one per line
  credproxy ca init --out DIR        write ca.pem + ca-key.pem for HTTPS interception
  credproxy version

flags:
  --config FILE       default $CREDPROXY_CONFIG, then ./credproxy.yaml
  --log-level LEVEL   debug | info | warn | error (default info)
  --watch             (run) reload when the config or a file it names changes
`

func main() {
	stopProfiles := startProfiles()
	code := run(os.Args[1:], os.Stdout, os.Stderr)
	stopProfiles()
	os.Exit(code)
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "version":
		fmt.Fprintf(stdout, "credproxy %s\n", version)
		return 0
	case "help":
		fmt.Fprint(stdout, usage)
		return 0
	case "ca":
		return caCommand(args, stdout, stderr)
	case "run", "validate":
	default:
		fmt.Fprintf(stderr, "credproxy: unknown command %q\n%s", cmd, usage)
		return 2
	}

	fs := flag.NewFlagSet("credproxy "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfgPath := fs.String("config", "", "")
	level := fs.String("log-level", "info", "")
	watch := fs.Bool("watch", false, "")
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		if err == nil {
			err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
		}
		fmt.Fprintf(stderr, "credproxy %s: %v\n%s", cmd, err, usage)
		return 2
	}
	path := configPath(*cfgPath)
	if cmd == "validate" {
		return validate(path, stdout, stderr)
	}

	cfg, err := config.Load(path)
	log, err2 := newLogger(*level, stderr)
	if err2 != nil {
		fmt.Fprintf(stderr, "credproxy: %v\n%s", err2, usage)
		return 2
	}
	defer log.Sync() //nolint:errcheck // stderr sync errors are not actionable
	if err != nil {
		for _, line := range config.Lines(err) {
			log.Error("invalid config", zap.String("config", path), zap.String("problem", line))
		}
		return 1
	}
	proxy.LogWarnings(log, path, cfg)
	if err := serve(cfg, path, *watch, log); err != nil {
		log.Error("credproxy failed", zap.Error(err))
		return 1
	}
	return 0
}

// validate runs "validate": it loads the config as run does, then builds
// everything run would build (proxy.Check) without binding, contacting or
// writing anything. Every problem goes to stderr, one line each starting
// with its key path, and the exit code is 1. Warnings go to stderr too,
// one line each as "warning: key.path: …", and leave the exit code alone;
// run logs the same warnings at start. A valid config says so on stdout.
func validate(path string, stdout, stderr io.Writer) int {
	cfg, warnings, err := config.LoadWithWarnings(path)
	if err == nil {
		err = proxy.Check(cfg, options())
	}
	for _, line := range config.Lines(err) {
		fmt.Fprintln(stderr, line)
	}
	for _, w := range warnings {
		fmt.Fprintf(stderr, "warning: %s\n", w)
	}
	if err != nil {
		return 1
	}
	fmt.Fprintf(stdout, "%s: valid\n", path)
	return 0
}

// options wires the protocols into the engine: Postgres services, then
// the HTTP proxy, which is also the order of their listeners and of
// validate's problems.
func options() proxy.Options {
	return proxy.Options{Protocols: []proxy.Protocol{
		postgres.NewProtocol(),
		httpproxy.NewProtocol(httpproxy.ProtocolOptions{}),
	}}
}

// caCommand runs "ca init --out DIR": a fresh ECDSA P-256 CA for HTTPS
// interception, and how to make apps trust it.
func caCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "init" {
		fmt.Fprintf(stderr, "credproxy ca: want \"ca init --out DIR\"\n%s", usage)
		return 2
	}
	fs := flag.NewFlagSet("credproxy ca init", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	out := fs.String("out", "", "")
	if err := fs.Parse(args[1:]); err != nil || fs.NArg() > 0 || *out == "" {
		fmt.Fprintf(stderr, "credproxy ca init: --out DIR is required\n%s", usage)
		return 2
	}
	if err := httpproxy.InitCA(*out, stdout); err != nil {
		fmt.Fprintf(stderr, "credproxy ca init: %v\n", err)
		return 1
	}
	return 0
}

func configPath(flagValue string) string {
	if flagValue != "" {
		return flagValue
	}
	if env := os.Getenv("CREDPROXY_CONFIG"); env != "" {
		return env
	}
	return "credproxy.yaml"
}

// newLogger builds zap's production JSON logger on w.
func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil || lvl < zapcore.DebugLevel || lvl > zapcore.ErrorLevel {
		return nil, fmt.Errorf("--log-level must be one of debug, info, warn, error")
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(core, zap.AddCaller()), nil
}

// serve runs the proxy until SIGTERM or SIGINT, then drains it for
// shutdown_grace; a second signal stops at once. SIGHUP (and, with
// --watch, a change to the config or a file it references) reloads.
func serve(cfg *config.Config, path string, watch bool, log *zap.Logger) error {
	procs, why, cpuLimit := setMaxProcs()
	srv, err := proxy.New(cfg, log, options())
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		return err
	}
	stopAttribution, err := startAttribution(cfg, srv, log)
	if err != nil {
		srv.Close()
		return err
	}
	fields := []zap.Field{zap.String("version", version), zap.String("config", path),
		zap.Int("gomaxprocs", procs), zap.String("gomaxprocs_from", why)}
	if cpuLimit > 0 {
		fields = append(fields, zap.Float64("cpu_limit", cpuLimit))
	}
	log.Info("credproxy started", fields...)

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)

	// Reloads run one at a time on their own goroutine, so a slow one
	// (binding, a Vault login) never delays a SIGTERM.
	reloads := make(chan struct{}, 1)
	requestReload := func() {
		select {
		case reloads <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var bg sync.WaitGroup
	defer bg.Wait()
	bg.Add(1)
	go func() {
		defer bg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case <-reloads:
				_ = srv.ReloadFile(path) // logged and counted by the server
			}
		}
	}()
	if watch {
		bg.Add(1)
		go func() {
			defer bg.Done()
			files := func() []string { return srv.ReferencedFiles(path) }
			if err := proxy.Watch(ctx, log, files, requestReload); err != nil {
				log.Error("--watch unavailable", zap.Error(err))
			}
		}()
	}

	for sig := range sigs {
		if sig == syscall.SIGHUP {
			log.Info("SIGHUP: reloading config", zap.String("config", path))
			requestReload()
			continue
		}
		log.Info("shutting down", zap.String("signal", sig.String()), zap.Duration("grace", srv.Config().ShutdownGrace.D()))
		break
	}
	cancel() // no more reloads
	sctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan struct{})
	bg.Add(1)
	go func() {
		defer bg.Done()
		for {
			select {
			case sig := <-sigs:
				if sig == syscall.SIGHUP {
					log.Info("SIGHUP ignored: shutting down")
					continue
				}
				log.Warn("second signal: closing open sessions now", zap.String("signal", sig.String()))
				stop()
				return
			case <-done:
				return
			}
		}
	}()
	stopAttribution() // no more pods published while draining
	err = srv.Shutdown(sctx, srv.Config().ShutdownGrace.D())
	close(done)
	log.Info("credproxy stopped")
	return err
}
