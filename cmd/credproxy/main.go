// Command credproxy is a transparent credential-injecting proxy: apps connect
// without secrets, credproxy logs in upstream with credentials it fetches.
//
// This file only parses the command line, wires signals and maps outcomes to
// exit codes: 0 clean stop, 1 bad config or start-up failure, 2 usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/credproxy/credproxy/config"
	"github.com/credproxy/credproxy/proxy"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `usage:
  credproxy run --config FILE        run the proxy (also: credproxy --config FILE)
  credproxy validate --config FILE   check a config; every problem, one per line
  credproxy version

flags:
  --config FILE       default $CREDPROXY_CONFIG, then ./credproxy.yaml
  --log-level LEVEL   debug | info | warn | error (default info)
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks a command-line mistake (exit 2).
var errUsage = errors.New("usage")

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
	case "run", "validate":
	default:
		fmt.Fprintf(stderr, "credproxy: unknown command %q\n%s", cmd, usage)
		return 2
	}

	fs := flag.NewFlagSet("credproxy "+cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfgPath := fs.String("config", "", "")
	level := fs.String("log-level", "info", "")
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		if err == nil {
			err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
		}
		fmt.Fprintf(stderr, "credproxy %s: %v\n%s", cmd, err, usage)
		return 2
	}
	path := configPath(*cfgPath)

	cfg, err := config.Load(path)
	if cmd == "validate" {
		if err != nil {
			for _, line := range config.Lines(err) {
				fmt.Fprintln(stderr, line)
			}
			return 1
		}
		fmt.Fprintf(stdout, "%s: valid\n", path)
		return 0
	}

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
	if err := serve(cfg, path, log); err != nil {
		log.Error("credproxy failed", zap.Error(err))
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
// shutdown_grace. A second signal stops at once.
func serve(cfg *config.Config, path string, log *zap.Logger) error {
	srv, err := proxy.New(cfg, log)
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	log.Info("credproxy started", zap.String("version", version), zap.String("config", path))

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	for sig := range sigs {
		if sig == syscall.SIGHUP {
			log.Warn("SIGHUP received; live reload is not available in this build, restart to apply config changes")
			continue
		}
		log.Info("shutting down", zap.String("signal", sig.String()), zap.Duration("grace", cfg.ShutdownGrace.D()))
		break
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	waiter := make(chan struct{})
	go func() {
		defer close(waiter)
		select {
		case <-sigs:
			log.Warn("second signal: closing open sessions now")
			cancel()
		case <-done:
		}
	}()
	err = srv.Shutdown(ctx, cfg.ShutdownGrace.D())
	close(done)
	<-waiter
	log.Info("credproxy stopped")
	return err
}
