// Command harness is a tiny step-ca (Smallstep certificates 0.19) wrapper used
// by the test-suite. It is built in GOPATH mode against the Debian package
// golang-github-smallstep-certificates-dev (see scripts/build-step-ca.sh).
//
//	harness init --steppath DIR --name NAME --dns 127.0.0.1,localhost \
//	    --address 127.0.0.1:PORT --provisioner admin@example --password-file FILE \
//	    [--min-dur 1m] [--max-dur 24h] [--default-dur 24h] [--allow-renewal-after-expiry]
//	    [--backdate 1h]
//
// creates a soft CA (root + intermediate + one JWK provisioner) under DIR and
// prints the root fingerprint (sha256 of the root DER, lower-case hex).
//
//	harness serve [step-ca flags] CONFIG
//
// runs the step-ca server exactly as the step-ca binary does
// (commands.AppCommand). STEPPATH must point to the CA directory.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/cas"
	"github.com/smallstep/certificates/cas/apiv1"
	"github.com/smallstep/certificates/commands"
	kmsapi "github.com/smallstep/certificates/kms/apiv1"
	"github.com/smallstep/certificates/pki"
	"github.com/urfave/cli"
	"go.step.sm/crypto/pemutil"

	// Register the SoftCAS implementation used by pki.New and ca.New.
	_ "github.com/smallstep/certificates/cas/softcas"
)

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "harness: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "init" {
		initCA(os.Args[2:])
		return
	}
	serve()
}

func serve() {
	app := cli.NewApp()
	app.Name = "step-ca"
	app.HelpName = "step-ca"
	app.Usage = "step-ca 0.19 test harness"
	app.Version = "0.19.0-harness"
	app.Writer = os.Stdout
	app.ErrWriter = os.Stderr
	start := commands.AppCommand
	start.Name = "serve"
	app.Commands = []cli.Command{start}
	// Like step-ca's own main: without a sub-command, run the server with the
	// given arguments (`harness [flags] CONFIG`).
	args := os.Args
	if len(args) < 2 || (args[1] != "serve" && args[1] != "help" && args[1] != "--help" && args[1] != "-h") {
		args = append([]string{args[0], "serve"}, args[1:]...)
	}
	if err := app.Run(args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}

func initCA(argv []string) {
	fs := flag.NewFlagSet("init", flag.ExitOnError)
	steppath := fs.String("steppath", "", "STEPPATH directory to create the CA in (required)")
	name := fs.String("name", "Reconciler Test CA", "CA name")
	dns := fs.String("dns", "127.0.0.1,localhost", "comma separated DNS names / IPs of the CA")
	address := fs.String("address", "127.0.0.1:9000", "listen address")
	prov := fs.String("provisioner", "admin@example", "JWK provisioner name")
	passFile := fs.String("password-file", "", "file with the password for keys and provisioner (required)")
	minDur := fs.String("min-dur", "1m", "minTLSCertDuration")
	maxDur := fs.String("max-dur", "24h", "maxTLSCertDuration")
	defDur := fs.String("default-dur", "24h", "defaultTLSCertDuration")
	backdate := fs.Duration("backdate", time.Hour, "backdate the root and intermediate NotBefore by this much (0: use pki.Generate*Certificate as is)")
	afterExpiry := fs.Bool("allow-renewal-after-expiry", false, "allowRenewalAfterExpiry claim")
	fs.Parse(argv)

	if *steppath == "" || *passFile == "" {
		die("init: --steppath and --password-file are required")
	}
	abs, err := filepath.Abs(*steppath)
	if err != nil {
		die("init: %v", err)
	}
	// go.step.sm/cli-utils/step reads STEPPATH in an init() function, so the
	// variable must be set before the process starts: re-exec ourselves.
	if os.Getenv("STEPPATH") != abs {
		if err := os.MkdirAll(abs, 0700); err != nil {
			die("init: %v", err)
		}
		os.Setenv("STEPPATH", abs)
		self, err := os.Executable()
		if err != nil {
			die("init: %v", err)
		}
		if err := syscall.Exec(self, os.Args, os.Environ()); err != nil {
			die("init: re-exec: %v", err)
		}
	}

	pwBytes, err := os.ReadFile(*passFile)
	if err != nil {
		die("init: %v", err)
	}
	password := []byte(strings.TrimRight(string(pwBytes), " \t\r\n"))

	parseDur := func(flagName, s string) *provisioner.Duration {
		d, err := time.ParseDuration(s)
		if err != nil {
			die("init: --%s: %v", flagName, err)
		}
		return &provisioner.Duration{Duration: d}
	}
	disableRenewal := false
	allowAfterExpiry := *afterExpiry
	claims := &provisioner.Claims{
		MinTLSDur:               parseDur("min-dur", *minDur),
		MaxTLSDur:               parseDur("max-dur", *maxDur),
		DefaultTLSDur:           parseDur("default-dur", *defDur),
		DisableRenewal:          &disableRenewal,
		AllowRenewalAfterExpiry: &allowAfterExpiry,
	}

	var dnsNames []string
	for _, d := range strings.Split(*dns, ",") {
		if d = strings.TrimSpace(d); d != "" {
			dnsNames = append(dnsNames, d)
		}
	}
	if len(dnsNames) == 0 {
		die("init: --dns is empty")
	}

	p, err := pki.New(apiv1.Options{Type: apiv1.SoftCAS, IsCreator: true},
		pki.WithAddress(*address),
		pki.WithDNSNames(dnsNames),
		pki.WithProvisioner(*prov),
	)
	if err != nil {
		die("init: pki.New: %v", err)
	}
	var root *apiv1.CreateCertificateAuthorityResponse
	if *backdate <= 0 {
		root, err = p.GenerateRootCertificate(*name, *name, *name, password)
		if err != nil {
			die("init: root: %v", err)
		}
		if err := p.GenerateIntermediateCertificate(*name, *name, *name, root, password); err != nil {
			die("init: intermediate: %v", err)
		}
	} else {
		root = generateBackdated(p, *name, *backdate, password)
	}
	if err := p.WriteFiles(); err != nil {
		die("init: write files: %v", err)
	}
	if err := p.GenerateKeyPairs(password); err != nil {
		die("init: provisioner keys: %v", err)
	}
	cfg, err := p.GenerateConfig(func(c *config.Config) error {
		// Global (authority-wide) claims, so that the provisioner claims are
		// always inside the global bounds.
		c.AuthorityConfig.Claims = claims
		c.Logger = []byte(`{"format": "text"}`)
		return nil
	})
	if err != nil {
		die("init: config: %v", err)
	}
	// GenerateConfig adds the provisioners after running the options.
	for _, pi := range cfg.AuthorityConfig.Provisioners {
		if jwk, ok := pi.(*provisioner.JWK); ok {
			jwk.Claims = claims
		}
	}
	if cfg.DB != nil {
		os.MkdirAll(cfg.DB.DataSource, 0700)
	}
	b, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		die("init: %v", err)
	}
	if err := os.WriteFile(p.GetCAConfigPath(), b, 0644); err != nil {
		die("init: %v", err)
	}

	fp := p.GetRootFingerprint()
	if root.Certificate != nil {
		sum := sha256.Sum256(root.Certificate.Raw)
		fp = hex.EncodeToString(sum[:])
	}
	defaults := map[string]string{
		"ca-url":      fmt.Sprintf("https://%s", hostPort(dnsNames[0], *address)),
		"ca-config":   p.GetCAConfigPath(),
		"fingerprint": fp,
		"root":        filepath.Join(abs, "certs", "root_ca.crt"),
	}
	b, _ = json.MarshalIndent(defaults, "", "\t")
	if err := os.WriteFile(filepath.Join(abs, "config", "defaults.json"), b, 0644); err != nil {
		die("init: %v", err)
	}
	fmt.Println(fp)
}

// generateBackdated does what pki.GenerateRootCertificate and
// pki.GenerateIntermediateCertificate do (same templates, same files), but with
// NotBefore = now - backdate. A brand-new CA otherwise has NotBefore = now,
// and step-ca's x5c renew-token check (jose.ParseX5cInsecure verifies the
// chain at leaf.NotAfter - 1m) rejects leaves expiring less than a minute
// after the CA was created, which breaks "renew an expired certificate" tests.
func generateBackdated(p *pki.PKI, name string, backdate time.Duration, pass []byte) *apiv1.CreateCertificateAuthorityResponse {
	svc, err := cas.New(context.Background(), apiv1.Options{Type: apiv1.SoftCAS, IsCreator: true})
	if err != nil {
		die("init: softcas: %v", err)
	}
	creator, ok := svc.(apiv1.CertificateAuthorityCreator)
	if !ok {
		die("init: softcas is not a CertificateAuthorityCreator")
	}
	encodeKey := func(key interface{}) []byte {
		block, err := pemutil.Serialize(key, pemutil.WithPassword(pass))
		if err != nil {
			die("init: encode key: %v", err)
		}
		return pem.EncodeToMemory(block)
	}
	encodeCert := func(c *x509.Certificate) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}

	root, err := creator.CreateCertificateAuthority(&apiv1.CreateCertificateAuthorityRequest{
		Name:     name + "-Root-CA",
		Type:     apiv1.RootCA,
		Lifetime: 10 * 365 * 24 * time.Hour,
		Backdate: backdate,
		CreateKey: &apiv1.CreateKeyRequest{
			Name:               p.RootKey[0],
			SignatureAlgorithm: kmsapi.UnspecifiedSignAlgorithm,
		},
		Template: &x509.Certificate{
			Subject:               pkix.Name{CommonName: name + " Root CA", Organization: []string{name}},
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			BasicConstraintsValid: true,
			IsCA:                  true,
			MaxPathLen:            1,
			MaxPathLenZero:        false,
		},
	})
	if err != nil {
		die("init: root: %v", err)
	}
	if root.KeyName != "" {
		p.RootKey[0] = root.KeyName
	}
	if err := p.WriteRootCertificate(root.Certificate, root.PrivateKey, pass); err != nil {
		die("init: root: %v", err)
	}

	inter, err := creator.CreateCertificateAuthority(&apiv1.CreateCertificateAuthorityRequest{
		Name:     name + "-Intermediate-CA",
		Type:     apiv1.IntermediateCA,
		Lifetime: 10 * 365 * 24 * time.Hour,
		Backdate: backdate,
		CreateKey: &apiv1.CreateKeyRequest{
			Name:               p.IntermediateKey,
			SignatureAlgorithm: kmsapi.UnspecifiedSignAlgorithm,
		},
		Template: &x509.Certificate{
			Subject:               pkix.Name{CommonName: name + " Intermediate CA", Organization: []string{name}},
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			BasicConstraintsValid: true,
			IsCA:                  true,
			MaxPathLen:            0,
			MaxPathLenZero:        true,
		},
		Parent: root,
	})
	if err != nil {
		die("init: intermediate: %v", err)
	}
	if inter.KeyName != "" {
		p.IntermediateKey = inter.KeyName
	}
	p.Files[p.Intermediate] = encodeCert(inter.Certificate)
	if inter.PrivateKey != nil {
		p.Files[p.IntermediateKey] = encodeKey(inter.PrivateKey)
	}
	return root
}

func hostPort(host, address string) string {
	port := address[strings.LastIndex(address, ":")+1:]
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + port
}
